"""The merge: a plan streamed through :func:`mtool.stream.stream_tensors`, then the output's config and record.

For each planned output tensor, in plan order, the workers read every input (a streamed tensor's plain inputs
stay on disk and are read chunk by chunk; the others are read now, with a ``+adapter`` LoRA applied and rows
aligned to the output vocabulary), and the calling thread merges: rounds to the recipe's ``dtype``, upcasts to
the compute dtype, runs the method, refuses NaN/Inf and casts to the output dtype.

Random methods get one generator per tensor, seeded from ``sha256(f"{seed}:{tensor name}")``
(:func:`mtool.seeding.tensor_seed`), so the bytes of the output do not depend on the order tensors are computed
in, nor on the device.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtool import ui
from mtool.io.dtypes import dtype_label
from mtool.io.folders import atomic_output_dir, copy_support_files, set_config_dtype, write_json
from mtool.io.hashing import FileHasher
from mtool.io.writing import DEFAULT_SHARD_BYTES, CheckpointWriter, TensorSpec
from mtool.lineage import Lineage, ParentInput, describe_parents_in_background
from mtool.merger.chunks import ChunkedTensor, ElementSource, InMemory, OnDisk
from mtool.merger.methods.base import MergeTask
from mtool.merger.plan import MergePlan, TensorPlan
from mtool.naming.finish import finish_output
from mtool.seeding import tensor_seed
from mtool.stream import Stream, StreamLimits, require_finite, stream_tensors

if TYPE_CHECKING:
    import torch

MERGE_LIMITS = StreamLimits()  # three tensors read ahead, 128 MiB at most; chunk buffers reused from the heap


@dataclass
class MergeOptions:
    seed: int = 0
    device: str = "cpu"
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    force: bool = False
    write_card: bool = True
    # called with the staging folder and the record once the weights are written, before the record and card are
    # (a search adds its record and chart there, so they appear with the output, atomically)
    annotate: Callable[[Path, Lineage], None] | None = None


def input_bytes(tensor: TensorPlan) -> int:
    """Bytes the inputs of ``tensor`` occupy once read (in their storage dtype)."""
    return sum(tensor.numel * source.model.checkpoint.info(source.tensor).dtype.itemsize for source in tensor.sources)


def streams(plan: MergePlan, tensor: TensorPlan) -> bool:
    """Whether ``tensor`` is merged chunk by chunk (its inputs then need not be read whole)."""
    pinned = tensor.vocabulary and plan.vocabulary is not None and bool(plan.vocabulary.pinned)
    return plan.method.streams and not pinned


def read_inputs(plan: MergePlan, tensor: TensorPlan) -> list[ElementSource]:
    """The tensor's inputs. Plain inputs of a streamed tensor stay on disk and are read chunk by chunk;
    the others are read now: LoRA applied, rows aligned to the output vocabulary."""
    from mtool.merger.tokenizer import align_rows, base_rows_for

    aligning = tensor.vocabulary and plan.vocabulary is not None
    if streams(plan, tensor) and not aligning and all(s.model.adapter is None for s in tensor.sources):
        return [OnDisk(s.model.checkpoint.info(s.tensor)) for s in tensor.sources]
    values = []
    for source in tensor.sources:
        value = source.model.checkpoint.read(source.tensor)
        if source.model.adapter is not None:
            value = source.model.adapter.apply(source.tensor, value)
        if plan.read_dtype is not None and value.dtype != plan.read_dtype:
            value = value.to(plan.read_dtype)
        values.append(value)
    if aligning:
        base_rows = None
        base_model = plan.models.get(plan.base_reference) if plan.base_reference else None
        if base_model is not None and base_model.resolve_tensor(tensor.name):
            base_weight = next((v for s, v in zip(tensor.sources, values) if s.model is base_model), None)
            if base_weight is None:
                base_weight = base_model.checkpoint.read(base_model.resolve_tensor(tensor.name))
            base_rows = base_rows_for(plan.vocabulary, base_weight, base_model.reference)
        values = align_rows(plan.vocabulary, tensor, values, base_rows)
    return [InMemory(value) for value in values]


def _checked(tensor: TensorPlan, result: "torch.Tensor") -> "torch.Tensor":
    return require_finite(result, f"tensor {tensor.name!r}", fix="check the inputs for NaN/Inf and the parameters "
                                                                  "(e.g. weights that sum to 0 with normalize)")


def merge_tensor(plan: MergePlan, tensor: TensorPlan, inputs: list[ElementSource], seed: int,
                 device: str = "cpu") -> Iterator[tuple[int, "torch.Tensor"]]:
    """One output tensor, as consecutive parts ``(first flat element, values in the output dtype)``.

    Streamed methods run over cache-sized chunks: each chunk of the inputs is read (or sliced), upcast, merged
    and cast to the output dtype while it is still in cache, so a tensor costs one pass over memory and never
    exists whole, neither in float32 nor at all (a statistics pass, when the method has one, comes first). The
    other methods see whole tensors in the compute dtype.
    """
    import torch

    method = plan.method
    per_tensor_seed = tensor_seed(seed, tensor.name) if method.random else None
    if streams(plan, tensor):
        chunked = ChunkedTensor(name=tensor.name, inputs=inputs, model_params=tensor.model_params,
                                params=tensor.params, base_index=tensor.base_index,
                                compute_dtype=plan.compute_dtype, seed=per_tensor_seed, device=device,
                                read_dtype=plan.read_dtype)
        prepared = method.prepare(chunked) if method.prepare is not None else None
        for start in chunked.starts():
            merged = method.map_chunk(chunked.task(start), prepared)
            yield start, _checked(tensor, merged).reshape(-1).to("cpu").to(tensor.out_dtype)
        return
    values = [source.elements(0, source.numel()).reshape(tensor.shape).to(device=device, dtype=plan.compute_dtype)
              for source in inputs]
    generator = None if per_tensor_seed is None else torch.Generator().manual_seed(per_tensor_seed)
    result = method.merge(MergeTask(name=tensor.name, inputs=values, model_params=tensor.model_params,
                                    params=tensor.params, base_index=tensor.base_index, generator=generator,
                                    seed=per_tensor_seed))
    result = _checked(tensor, result).to("cpu").to(tensor.out_dtype)
    if plan.vocabulary is not None and tensor.vocabulary and plan.vocabulary.pinned:
        from mtool.merger.tokenizer import apply_pins

        aligned = {s.model.reference: v for s, v in zip(tensor.sources, values)}
        result = apply_pins(plan.vocabulary, tensor, result, aligned)
    yield 0, result.reshape(-1)


def output_config(plan: MergePlan) -> dict:
    """The output's config.json: the config model's, with the layer count, tying, vocabulary and dtype the
    merge produced."""
    config = dict(plan.config_model.config)
    if "num_hidden_layers" in config or plan.num_layers:
        config["num_hidden_layers"] = plan.num_layers
    names = {t.name for t in plan.tensors}
    if "lm_head.weight" in names and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    if plan.vocabulary is not None:
        config["vocab_size"] = plan.vocabulary.size
    dtypes = {t.out_dtype for t in plan.tensors if t.out_dtype.is_floating_point}
    if len(dtypes) == 1:
        set_config_dtype(config, next(iter(dtypes)))
    if "layer_types" in config and isinstance(config["layer_types"], list):
        layer_types = config["layer_types"]
        config["layer_types"] = (layer_types * (plan.num_layers // max(1, len(layer_types)) + 1))[:plan.num_layers]
    return config


def _write_support_files(plan: MergePlan, folder: Path) -> None:
    write_json(folder / "config.json", output_config(plan))
    generation = plan.config_model.checkpoint.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")
    if plan.vocabulary is not None and plan.vocabulary.added_tokens:
        from mtool.merger.tokenizer import write_tokenizer

        write_tokenizer(plan, folder)
    elif plan.tokenizer_model is not None:
        copy_support_files(plan.tokenizer_model.checkpoint.folder, folder, config=False, tokenizer=True)
    if plan.chat_template is not None:
        (folder / "chat_template.jinja").write_text(plan.chat_template, encoding="utf-8")
        tokenizer_config = folder / "tokenizer_config.json"
        if tokenizer_config.is_file():
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            data.pop("chat_template", None)
            write_json(tokenizer_config, data)


def _parents(plan: MergePlan) -> list[ParentInput]:
    """The record's parents: every model (the base as such), and every ``+adapter`` after its model."""
    parents = []
    for reference, model in plan.models.items():
        parents.append(ParentInput(model.ref, "base" if reference == plan.base_reference else "model"))
        if model.adapter_ref is not None:
            parents.append(ParentInput(model.adapter_ref, "adapter"))
    return parents


def execute(plan: MergePlan, output: str | os.PathLike, options: MergeOptions, *,
            hasher: FileHasher | None = None) -> Path:
    """Run the plan into the folder ``output`` (atomic: nothing is left behind on failure). ``hasher`` hashes the
    inputs for the lineage record (pass the one that started hashing them early)."""
    output = Path(output)
    hasher = hasher or FileHasher.default()
    inputs = [m.checkpoint.folder for m in plan.models.values()]
    inputs += [m.adapter_ref.path for m in plan.models.values() if m.adapter_ref is not None]
    specs = [TensorSpec(t.name, tuple(t.shape), t.out_dtype) for t in plan.tensors]
    started = time.perf_counter()
    with atomic_output_dir(output, force=options.force, inputs=inputs) as staging:
        parents = describe_parents_in_background(_parents(plan), hasher)
        stream = Stream(jobs=plan.tensors, name=lambda tensor: tensor.name,
                        prepare=lambda tensor: read_inputs(plan, tensor),
                        produce=lambda tensor, values: merge_tensor(plan, tensor, values, options.seed, options.device),
                        held_bytes=input_bytes)
        with CheckpointWriter(staging, specs, max_shard_bytes=options.max_shard_bytes, in_order=True,
                              metadata={"mtool_merge_method": plan.method.name}) as writer:
            stream_tensors(stream, writer, limits=MERGE_LIMITS, description=f"merge ({plan.method.name})")
        _write_support_files(plan, staging)
        record = Lineage(
            operation="merge",
            method=plan.method.name,
            parents=parents.result(),
            recipe=plan.recipe.canonical(),
            parameters={"dtype": plan.recipe.dtype, "out_dtype": plan.recipe.out_dtype,
                        "compute_dtype": dtype_label(plan.compute_dtype),
                        "num_hidden_layers": plan.num_layers},
            seed=options.seed if plan.method.random else None,
            parameter_count=sum(spec.numel for spec in specs),
        )
        if options.annotate is not None:
            options.annotate(staging, record)
        finish_output(staging, record, hasher=hasher, digests=writer.digests, card=options.write_card)
    total_bytes = sum(spec.nbytes for spec in specs)
    elapsed = time.perf_counter() - started
    ui.info(f"wrote {output} ({total_bytes / 1e9:.2f} GB, {len(specs)} tensors) in {elapsed:.1f} s")
    return output
