"""The streaming executor: read inputs, merge, write each tensor straight into its place.

For each planned output tensor, in plan order: read every input tensor (positioned reads, prefetched a few
tensors ahead by a small thread pool so disk and math overlap), apply a ``+adapter`` LoRA, round to the
recipe's ``dtype``, upcast to the compute dtype, align vocabulary rows, run the method, refuse NaN/Inf, cast
to the output dtype and hand the result to a writer thread. Peak memory is a few tensors, never a model.

Random methods get one generator per tensor, seeded from ``sha256(f"{seed}:{tensor name}")``, so the bytes
of the output do not depend on the order tensors are computed in, nor on the device.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtool import ui
from mtool.checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointWriter,
    TensorInfo,
    TensorSpec,
    atomic_output_dir,
    copy_support_files,
    dtype_to_safetensors,
    read_elements,
)
from mtool.errors import ComputeError
from mtool.lineage import Lineage, Parent, describe_parent, hash_files, write_lineage
from mtool.memory import reuse_freed_buffers
from mtool.merger.methods.base import ChunkedTensor, ElementSource, InMemory, MergeTask, hashed_seed
from mtool.merger.plan import MergePlan, TensorPlan

if TYPE_CHECKING:
    import torch

PREFETCH_TENSORS = 3
ELEMENTWISE_CHUNK = 1 << 20  # elements: a few such float32 chunks stay in a core's cache
PREFETCH_BYTES = 128 * 2**20
PENDING_WRITES = 8  # output parts queued for the writer thread


def _input_bytes(tensor: TensorPlan) -> int:
    """Bytes the inputs of ``tensor`` occupy once read (in their storage dtype)."""
    count = math.prod(tensor.shape)
    return sum(count * source.model.checkpoint.info(source.tensor).dtype.itemsize for source in tensor.sources)


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor: the first 8 bytes of sha256("<seed>:<name>")."""
    return hashed_seed(seed, name) >> 1


@dataclass
class MergeOptions:
    seed: int = 0
    device: str = "cpu"
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    force: bool = False
    write_card: bool = True


@dataclass(frozen=True)
class OnDisk:
    """An :class:`~mtool.merger.methods.base.ElementSource` read slice by slice from its file."""

    info: TensorInfo

    def numel(self) -> int:
        return self.info.numel

    def elements(self, start: int, count: int) -> "torch.Tensor":
        return read_elements(self.info, start, count)


def _streams(plan: MergePlan, tensor: TensorPlan) -> bool:
    """Whether ``tensor`` is merged chunk by chunk (its inputs then need not be read whole)."""
    pinned = tensor.vocabulary and plan.vocabulary is not None and bool(plan.vocabulary.pinned)
    return (plan.method.elementwise or plan.method.finish is not None) and not pinned


def _read_inputs(plan: MergePlan, tensor: TensorPlan) -> list[ElementSource]:
    """The tensor's inputs. Plain inputs of a streamed tensor stay on disk and are read chunk by chunk;
    the others are read now: LoRA applied, rows aligned to the output vocabulary."""
    from mtool.merger.tokenizer import align_rows, base_rows_for

    aligning = tensor.vocabulary and plan.vocabulary is not None
    if _streams(plan, tensor) and not aligning and all(s.model.adapter is None for s in tensor.sources):
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


def merge_tensor(plan: MergePlan, tensor: TensorPlan, inputs: list[ElementSource], seed: int,
                 device: str = "cpu") -> Iterator[tuple[int, "torch.Tensor"]]:
    """One output tensor, as consecutive parts ``(first flat element, values in the output dtype)``.

    Element-wise methods, and those with ``prepare``/``finish``, run over cache-sized chunks: each chunk of
    the inputs is read (or sliced), upcast, merged and cast to the output dtype while it is still in cache,
    so a tensor costs one pass over memory and never exists whole, neither in float32 nor at all. The
    other methods see whole tensors in the compute dtype.
    """
    import torch

    method = plan.method
    per_tensor_seed = tensor_seed(seed, tensor.name) if method.random else None
    if _streams(plan, tensor):
        chunked = ChunkedTensor(name=tensor.name, inputs=inputs, model_params=tensor.model_params,
                                params=tensor.params, base_index=tensor.base_index,
                                compute_dtype=plan.compute_dtype, chunk_size=ELEMENTWISE_CHUNK,
                                seed=per_tensor_seed, device=device, read_dtype=plan.read_dtype)
        prepared = method.prepare(chunked) if method.prepare is not None else None
        for start in chunked.starts():
            task = chunked.chunk(start)
            merged = method.finish(task, prepared) if method.finish is not None else method.merge(task)
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


def _checked(tensor: TensorPlan, result: "torch.Tensor") -> "torch.Tensor":
    """Refuse NaN/Inf: one reduction first (any NaN or Inf makes the sum non-finite), the full test only then."""
    import torch

    if result.is_floating_point() and not torch.isfinite(result.sum()) and not torch.isfinite(result).all():
        raise ComputeError(f"the merge produced NaN or Inf values in tensor {tensor.name!r}",
                           fix="check the inputs for NaN/Inf and the parameters (e.g. weights that sum to 0 "
                               "with normalize)")
    return result


def _output_config(plan: MergePlan) -> dict:
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
        config["dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        config.pop("torch_dtype", None)
    if "layer_types" in config and isinstance(config["layer_types"], list):
        layer_types = config["layer_types"]
        config["layer_types"] = (layer_types * (plan.num_layers // max(1, len(layer_types)) + 1))[:plan.num_layers]
    return config


def _write_support_files(plan: MergePlan, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(_output_config(plan), indent=2) + "\n", encoding="utf-8")
    copy_support_files(plan.config_model.checkpoint.folder, folder, config=False, tokenizer=False)
    generation = plan.config_model.checkpoint.folder / "generation_config.json"
    if generation.is_file():
        (folder / "generation_config.json").write_bytes(generation.read_bytes())
    if plan.vocabulary is not None and plan.vocabulary.added_tokens:
        from mtool.merger.tokenizer import write_tokenizer

        write_tokenizer(plan, folder)
    elif plan.tokenizer_model is not None:
        copy_support_files(plan.tokenizer_model.checkpoint.folder, folder, config=False, tokenizer=True)
    template = plan.recipe.chat_template
    if template:
        from mtool.merger.chat_templates import resolve_chat_template

        text = resolve_chat_template(template, plan)
        (folder / "chat_template.jinja").write_text(text, encoding="utf-8")
        tokenizer_config = folder / "tokenizer_config.json"
        if tokenizer_config.is_file():
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            data.pop("chat_template", None)
            tokenizer_config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


class _ParentHasher:
    """Describes the parents (sha256 of every weight file) in a background thread during the merge."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.parents: list[Parent] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for reference, model in self.plan.models.items():
                role = "base" if reference == self.plan.base_reference else "model"
                self.parents.append(describe_parent(model.ref, role))
                if model.adapter_ref is not None:
                    self.parents.append(describe_parent(model.adapter_ref, "adapter"))
        except BaseException as error:  # noqa: BLE001 - re-raised in result()
            self.error = error

    def result(self) -> list[Parent]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.parents


def execute(plan: MergePlan, output: str | os.PathLike, options: MergeOptions) -> Path:
    """Run the plan into the folder ``output`` (atomic: nothing is left behind on failure)."""
    import torch

    output = Path(output)
    # One thread of math: the other cores read, write and hash in parallel, and small element-wise chunks
    # do not pay for waking a thread team on every operation.
    torch.set_num_threads(1)
    reuse_freed_buffers()
    inputs = [m.checkpoint.folder for m in plan.models.values()]
    inputs += [m.adapter_ref.path for m in plan.models.values() if m.adapter_ref is not None]
    specs = [TensorSpec(t.name, tuple(t.shape), t.out_dtype) for t in plan.tensors]
    total_bytes = sum(spec.nbytes for spec in specs)
    started = time.perf_counter()
    with atomic_output_dir(output, force=options.force, inputs=inputs) as staging:
        hasher = _ParentHasher(plan)
        metadata = {"mtool_merge_method": plan.method.name}
        # the writer closes last: the pools first finish (or fail) every read and write they were given
        with CheckpointWriter(staging, specs, max_shard_bytes=options.max_shard_bytes,
                              metadata=metadata, in_order=True) as writer, \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="mtool-read") as readers, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtool-write") as writer_thread:
            pending_reads: deque[tuple[TensorPlan, Future]] = deque()
            pending_writes: deque[Future] = deque()
            upcoming = iter(plan.tensors)

            def schedule() -> None:
                """Read ahead up to PREFETCH_TENSORS tensors, but no more than PREFETCH_BYTES at once."""
                while len(pending_reads) < PREFETCH_TENSORS:
                    if not waiting:
                        following = next(upcoming, None)
                        if following is None:
                            return
                        waiting.append(following)
                    pending_bytes = sum(_input_bytes(t) for t, _ in pending_reads)
                    if pending_reads and pending_bytes + _input_bytes(waiting[0]) > PREFETCH_BYTES:
                        return
                    tensor = waiting.pop()
                    pending_reads.append((tensor, readers.submit(_read_inputs, plan, tensor)))

            waiting: list[TensorPlan] = []

            schedule()
            bar = ui.progress(total=total_bytes, desc=f"merge ({plan.method.name})", unit="B", unit_scale=True)
            with torch.inference_mode():
                while pending_reads:
                    tensor, future = pending_reads.popleft()
                    values = future.result()
                    schedule()
                    for start, part in merge_tensor(plan, tensor, values, options.seed, options.device):
                        pending_writes.append(writer_thread.submit(writer.write_part, tensor.name, start, part))
                        while len(pending_writes) > PENDING_WRITES:
                            pending_writes.popleft().result()
                        bar.update(part.numel() * part.element_size())
                    del values
                while pending_writes:
                    pending_writes.popleft().result()
            bar.close()
        digests = writer.digests
        _write_support_files(plan, staging)
        record = Lineage(
            operation="merge",
            method=plan.method.name,
            parents=hasher.result(),
            recipe=plan.recipe.canonical(),
            parameters={"dtype": plan.recipe.dtype, "out_dtype": plan.recipe.out_dtype,
                        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
                        "num_hidden_layers": plan.num_layers},
            seed=options.seed if plan.method.random else None,
            outputs={**hash_files(f for f in sorted(staging.glob("*.safetensors")) if f.name not in digests),
                     **digests},
            parameter_count=sum(spec.numel for spec in specs),
        )
        write_lineage(staging, record)
        if options.write_card:
            _card(staging)
    elapsed = time.perf_counter() - started
    ui.info(f"wrote {output} ({total_bytes / 1e9:.2f} GB, {len(specs)} tensors) in {elapsed:.1f} s")
    return output


def _card(folder: Path) -> None:
    """Write the model card (README.md) derived from the folder's lineage record."""
    from mtool.naming.card import write_card

    write_card(folder)


def tensor_working_bytes(plan: MergePlan, tensor: TensorPlan) -> int:
    """Memory the executor needs for ``tensor`` beyond the interpreter itself.

    Streamed from disk: a chunk of every input in the compute dtype plus a few chunk-sized temporaries and the
    parts queued for the writer; TIES adds one model's magnitudes of the whole tensor (and about as much for
    selecting its threshold), DARE its keep masks (one byte an entry and model). Read whole: every input in
    its storage dtype and in the compute dtype, about three tensors of scratch, and the output."""
    count = math.prod(tensor.shape)
    compute = plan.compute_dtype.itemsize
    inputs = len(tensor.sources)
    out = tensor.out_dtype.itemsize
    if _streams(plan, tensor) and not (tensor.vocabulary and plan.vocabulary is not None):
        chunk = min(count, ELEMENTWISE_CHUNK)
        working = chunk * compute * (inputs + 6) + PENDING_WRITES * chunk * out
        if plan.method.prepare is not None and plan.method.name not in ("slerp",):
            working += 3 * count * compute + count * (inputs - 1)
        return working
    storage = sum(s.model.checkpoint.info(s.tensor).dtype.itemsize for s in tensor.sources)
    return count * (storage + compute * (inputs + 3) + out)


def estimate_peak_bytes(plan: MergePlan) -> int:
    """Upper estimate of the executor's working memory: the largest tensor's working memory plus what is read
    ahead for the next ones (at most PREFETCH_BYTES)."""
    if not plan.tensors:
        return 0
    return max(tensor_working_bytes(plan, t) for t in plan.tensors) + PREFETCH_BYTES


def describe_plan(plan: MergePlan) -> str:
    """The plan as text for ``--dry-run``: outputs grouped by layer, their sources and parameters."""
    lines = [f"merge method: {plan.method.name}; {len(plan.tensors)} output tensors, {plan.num_layers} layers; "
             f"compute {str(plan.compute_dtype).removeprefix('torch.')}"]
    for layer, tensors in plan.by_layer().items():
        lines.append(f"\n{'embeddings / head / final norm' if layer is None else f'layer {layer}'}:")
        for tensor in tensors:
            sources = ", ".join(f"{s.model.label}:{s.tensor}" for s in tensor.sources)
            params = dict(tensor.params)
            per_model = [p for p in tensor.model_params if p]
            text = f"  {tensor.name} {list(tensor.shape)} {dtype_to_safetensors(tensor.out_dtype)} <- {sources}"
            if params:
                text += f" | {', '.join(f'{k}={_fmt(v)}' for k, v in params.items())}"
            if per_model:
                text += " | " + "; ".join(", ".join(f"{k}={_fmt(v)}" for k, v in p.items()) for p in per_model)
            lines.append(text)
    total = sum(math.prod(t.shape) * t.out_dtype.itemsize for t in plan.tensors)
    lines.append(f"\noutput size {total / 1e9:.3f} GB; estimated peak working memory (beyond Python and torch) "
                 f"{estimate_peak_bytes(plan) / 2**20:.0f} MiB")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
