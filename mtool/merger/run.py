"""The merge: a plan streamed through :func:`mtool.stream.stream_tensors`, then the output's config and record.

For each planned output tensor, in plan order, the workers read every input (a streamed tensor's plain inputs
stay on disk and are read chunk by chunk; the others are read now, with a ``+adapter`` LoRA applied and rows
aligned to the output vocabulary), and the calling thread merges: rounds to the recipe's ``dtype``, converts to
the tensor's compute dtype (:mod:`mtool.merger.precision`), runs the method, refuses NaN/Inf and casts to the
output dtype.

Random methods get one generator per tensor, seeded from ``sha256(f"{seed}:{tensor name}")``
(:func:`mtool.seeding.tensor_seed`), so the bytes of the output do not depend on the order tensors are computed
in, nor on the device. mergekit draws from torch's global generator in its own execution order instead, so the
two tools keep different random entries (with the same probabilities).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool import ui
from mtool.io.folders import (
    RECORD_ALLOWANCE,
    atomic_output_dir,
    copy_support_files,
    set_config_dtype,
    support_files_bytes,
    write_json,
)
from mtool.io.hashing import FileHasher
from mtool.io.writing import DEFAULT_SHARD_BYTES, CheckpointWriter, TensorSpec, planned_bytes
from mtool.lineage import Lineage, ParentInput, describe_parents_in_background
from mtool.merger.chunks import ChunkedTensor, ElementSource, InMemory, OnDisk
from mtool.merger.layout import LM_HEAD
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
    record_extras: dict = field(default_factory=dict)  # more parameters for the lineage record (a run's stages)
    parent_names: dict[str, str] = field(default_factory=dict)  # parent folder -> the id the record gives it
    # called with the staging folder and the record once the weights are written, before the record and card are
    # (a search adds its record and chart there, so they appear with the output, atomically)
    annotate: Callable[[Path, Lineage], None] | None = None


def input_bytes(tensor: TensorPlan) -> int:
    """Bytes the inputs of ``tensor`` occupy once read (in their storage dtype)."""
    return sum(tensor.numel * source.model.dtype(source.tensor).itemsize for source in tensor.sources)


def streams(plan: MergePlan, tensor: TensorPlan) -> bool:
    """Whether ``tensor`` is merged chunk by chunk (its inputs then need not be read whole)."""
    return plan.method.streams


def read_inputs(plan: MergePlan, tensor: TensorPlan) -> list[ElementSource]:
    """The tensor's inputs. Plain inputs of a streamed tensor stay on disk and are read chunk by chunk;
    the others are read now: LoRA applied, rows aligned to the output vocabulary."""
    from mtool.merger.tokenizer import align_rows, base_rows_for

    aligning = tensor.vocabulary and plan.vocabulary is not None
    stored = [s.model.stored_name(s.tensor) for s in tensor.sources]
    if streams(plan, tensor) and not aligning and all(s.model.adapter is None for s in tensor.sources) \
            and all(stored):
        return [OnDisk(s.model.checkpoint.info(name)) for s, name in zip(tensor.sources, stored)]
    values = []
    for source in tensor.sources:
        value = source.model.read(source.tensor)
        if source.model.adapter is not None and source.model.stored_name(source.tensor):
            applied = source.model.adapter.apply(source.model.stored_name(source.tensor), value)
            value = applied if plan.settings.math == "float32" else applied.to(value.dtype)
        if plan.read_dtype is not None and value.dtype != plan.read_dtype:
            value = value.to(plan.read_dtype)
        values.append(value)
    if aligning:
        base_rows = None
        base_model = plan.models.get(plan.base_reference) if plan.base_reference else None
        if plan.settings.vocabulary_fill == "base" and base_model is not None and \
                base_model.resolve_tensor(tensor.name):
            base_weight = next((v for s, v in zip(tensor.sources, values) if s.model is base_model), None)
            if base_weight is None:
                base_weight = base_model.read(base_model.resolve_tensor(tensor.name))
            base_rows = base_rows_for(plan.vocabulary, base_weight, base_model.reference)
        values = align_rows(plan, tensor, values, base_rows)
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
                                compute_dtype=tensor.compute_dtype, seed=per_tensor_seed, device=device,
                                read_dtype=plan.read_dtype)
        prepared = method.prepare(chunked) if method.prepare is not None else None
        for start in chunked.starts():
            merged = method.map_chunk(chunked.task(start), prepared)
            yield start, _checked(tensor, merged).reshape(-1).to("cpu").to(tensor.out_dtype)
        return
    values = [source.elements(0, source.numel()).reshape(tensor.shape).to(device=device, dtype=tensor.compute_dtype)
              for source in inputs]
    generator = None if per_tensor_seed is None else torch.Generator().manual_seed(per_tensor_seed)
    result = method.merge(MergeTask(name=tensor.name, inputs=values, model_params=tensor.model_params,
                                    params=tensor.params, base_index=tensor.base_index, generator=generator,
                                    seed=per_tensor_seed))
    result = _checked(tensor, result).to("cpu").to(tensor.out_dtype)
    yield 0, result.reshape(-1)


def output_config(plan: MergePlan) -> tuple[dict, list[str]]:
    """The output's config.json as mergekit writes it (the base model's config, else the first model's, with the
    language tower's layer count, the recipe's ``out_dtype`` or ``dtype``, and the merged vocabulary's size),
    and the repairs mtool makes where that config would contradict the merged weights (each also a warning)."""
    config = json.loads(json.dumps(plan.config_model.config))
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    layers_key = next((key for key in ("num_hidden_layers", "n_layer", "num_layers") if key in text), None)
    if layers_key is not None:
        text[layers_key] = plan.num_layers
    dtype = plan.out_dtype or plan.read_dtype
    if dtype is not None:
        set_config_dtype(config, dtype)
    if plan.vocabulary is not None:
        text["vocab_size"] = plan.vocabulary.size
    repairs = []
    names = {t.name for t in plan.tensors}
    if LM_HEAD in names and text.get("tie_word_embeddings") is True:
        text["tie_word_embeddings"] = False
        repairs.append("tie_word_embeddings: false (the merge writes lm_head.weight, which a tied model would "
                       "replace with the input embedding)")
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list) and layer_types and len(layer_types) != plan.num_layers:
        text["layer_types"] = (layer_types * (plan.num_layers // len(layer_types) + 1))[:plan.num_layers]
        repairs.append(f"layer_types: {len(layer_types)} entries -> {plan.num_layers}, the pattern repeated (one per "
                       "output layer; transformers refuses a list of another length)")
    return config, repairs


def _write_support_files(plan: MergePlan, folder: Path) -> list[str]:
    config, repairs = output_config(plan)
    for repair in repairs:
        plan.diagnostics.note(f"config.json: {repair}; mergekit leaves the config as it is")
    write_json(folder / "config.json", config)
    generation = plan.config_model.checkpoint.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")
    if plan.vocabulary is not None:
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
    return repairs


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
    metadata = {"mtool_merge_method": plan.method.name}
    needed = planned_bytes(specs, max_shard_bytes=options.max_shard_bytes, metadata=metadata, in_order=True) \
        + support_files_bytes(plan.config_model.checkpoint.folder, tokenizer=False) + RECORD_ALLOWANCE \
        + (support_files_bytes(plan.tokenizer_model.checkpoint.folder, config=False) if plan.tokenizer_model else 0)
    with atomic_output_dir(output, force=options.force, inputs=inputs, needed_bytes=needed) as staging:
        parents = describe_parents_in_background(_parents(plan), hasher)
        stream = Stream(jobs=plan.tensors, name=lambda tensor: tensor.name,
                        prepare=lambda tensor: read_inputs(plan, tensor),
                        produce=lambda tensor, values: merge_tensor(plan, tensor, values, options.seed, options.device),
                        held_bytes=input_bytes)
        with CheckpointWriter(staging, specs, max_shard_bytes=options.max_shard_bytes, in_order=True,
                              metadata=metadata) as writer:
            stream_tensors(stream, writer, limits=MERGE_LIMITS, description=f"merge ({plan.method.name})")
        repairs = _write_support_files(plan, staging)
        record = Lineage(
            operation="merge",
            method=plan.method.name,
            parents=parents.result(),
            recipe=plan.recipe.canonical(),
            parameters={"dtype": plan.recipe.dtype, "out_dtype": plan.recipe.out_dtype,
                        "math": plan.settings.math, "num_hidden_layers": plan.num_layers,
                        **({"mtool_settings": plan.settings.differences()} if plan.settings.differences() else {}),
                        **({"config_repairs": repairs} if repairs else {}),
                        **options.record_extras},
            seed=options.seed if plan.method.random else None,
            parameter_count=sum(spec.numel for spec in specs),
            warnings=list(plan.diagnostics.messages) or None,
        )
        for parent in record.parents:
            parent.id = options.parent_names.get(parent.path or "", parent.id)
        if options.annotate is not None:
            options.annotate(staging, record)
        finish_output(staging, record, hasher=hasher, digests=writer.digests, card=options.write_card)
    total_bytes = sum(spec.nbytes for spec in specs)
    elapsed = time.perf_counter() - started
    ui.info(f"wrote {output} ({total_bytes / 1e9:.2f} GB, {len(specs)} tensors) in {elapsed:.1f} s")
    return output
