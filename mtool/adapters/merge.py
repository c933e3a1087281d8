"""``mtool adapters merge``: fold one or more LoRA adapters into their base, streamed tensor by tensor.

For every tensor of the base, in the base's order: read it (one positioned read), and if an adapter changes it
compute in float32

    W0 = W                          or dequantize(quantize_4bit(W)) with --dequantized-base (float32, exact)
    W' = adapter_k(... adapter_1(W0))  each adapter_k: W + w_k * s_k * B_k @ A_k (DoRA: m / ||W0 + dW|| * (W + dW))

then cast once to the output dtype and write it straight into its place in the output shards. Unchanged
tensors are copied as they are. Peak memory is a few tensors, never the model.

Tied embeddings. A base saved with ``tie_word_embeddings`` stores one matrix ``E`` for the input embedding and
the output head. With the adapter applied, the input embedding is ``E`` changed by what the adapter does to
the embedding, and the head is ``E`` changed by what it does to ``lm_head`` (PEFT ties trainable-token rows to
both). When the two results are equal the output stays tied; otherwise it is written untied (``lm_head.weight``
stored, ``tie_word_embeddings: false``), so the merged model computes what the adapter model computed. (PEFT's
``merge_and_unload`` writes the embedding's update into the shared matrix and changes the head too.)
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.adapters.basemodel import HEAD, fit_problems, tied_embedding
from mtool.adapters.quantize import QuantSettings, dequantized, is_quantized_weight
from mtool.adapters.validate import adapter_weights
from mtool.errors import InputError
from mtool.hub import ModelRef, resolve_model
from mtool.io.dtypes import dtype_label
from mtool.io.folders import (
    RECORD_ALLOWANCE,
    atomic_output_dir,
    copy_support_files,
    set_config_dtype,
    support_files_bytes,
    write_json,
)
from mtool.io.hashing import FileHasher
from mtool.io.reading import Checkpoint, open_checkpoint
from mtool.io.writing import DEFAULT_SHARD_BYTES, CheckpointWriter, TensorSpec, planned_bytes
from mtool.lineage import Lineage, ParentInput, describe_parents_in_background
from mtool.lora.adapter import LoraAdapter, load_lora, refuse_adapter
from mtool.naming.finish import finish_output
from mtool.runtime import RETURN_FREED_MEMORY
from mtool.stream import Stream, StreamLimits, require_finite, stream_tensors

if TYPE_CHECKING:
    import torch

# Three tensors read and merged ahead of the writer by two workers, 128 MiB at most (a larger tensor goes alone);
# every block of 1 MiB or more goes back to the system when freed.
ADAPTER_MERGE_LIMITS = StreamLimits(allocator=RETURN_FREED_MEMORY)
ROW_BLOCK_ELEMENTS = 1 << 20  # float32 scratch of the row-block update: 4 MiB


@dataclass(frozen=True)
class AdapterMergeOptions:
    """How to merge: per-adapter weights, output dtype, the QLoRA-rounded base, shard size, replacing OUT."""

    weights: tuple[float, ...] | None = None
    dtype: "torch.dtype | None" = None
    dequantized_base: QuantSettings | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    force: bool = False


@dataclass(frozen=True)
class WeightedAdapter:
    ref: ModelRef
    adapter: LoraAdapter
    weight: float


@dataclass
class AdapterMergePlan:
    """Everything decided before a byte is written: output tensors, sources, the tied-embedding outcome."""

    base: ModelRef
    checkpoint: Checkpoint
    config: dict
    adapters: list[WeightedAdapter]
    specs: list[TensorSpec]
    sources: dict[str, str]  # output tensor -> base tensor it starts from
    changed: set[str]  # output tensors an adapter changes
    quant: QuantSettings | None
    untied: bool = False
    precomputed: dict[str, "torch.Tensor"] = field(default_factory=dict)  # the tied pair, when touched


def plan_adapter_merge(base: str, adapters: list[str], options: AdapterMergeOptions) -> AdapterMergePlan:
    """Open and check every input; raises :class:`InputError` naming the first problem."""
    weights = adapter_weights(len(adapters), options.weights, "merge")
    base_ref = resolve_model(base)
    refuse_adapter(base_ref.path, what="a base model (BASE)", fix="give the base model first, then the adapter(s)")
    checkpoint = open_checkpoint(base_ref.path)
    config = checkpoint.read_json("config.json") or {}
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise InputError(f"the base holds {method} weights; mtool merges into full-precision weights",
                         where=str(base_ref.path),
                         fix="give the original 16-bit base (add --dequantized-base to reproduce the QLoRA base)")
    loaded = []
    for reference, weight in zip(adapters, weights):
        ref = resolve_model(reference)
        loaded.append(WeightedAdapter(ref, load_lora(ref.path), float(weight)))
    plan = AdapterMergePlan(base=base_ref, checkpoint=checkpoint, config=config, adapters=loaded, specs=[],
                            sources={}, changed=set(), quant=options.dequantized_base)
    for item in loaded:
        _, problems = fit_problems(item.adapter, checkpoint, config)
        if problems:
            raise InputError(f"the adapter does not fit this base: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                             where=str(item.adapter.folder), fix="use the base model the adapter was trained on")
    for name in checkpoint.names:
        info = checkpoint.info(name)
        plan.sources[name] = name
        out_dtype = options.dtype if options.dtype is not None and info.dtype.is_floating_point else info.dtype
        plan.specs.append(TensorSpec(name, info.shape, out_dtype))
        if any(item.adapter.touches(name) for item in loaded):
            plan.changed.add(name)
    embedding = tied_embedding(checkpoint, config)
    if embedding is not None:
        _resolve_tied_pair(plan, embedding)
    return plan


def _resolve_tied_pair(plan: AdapterMergePlan, embedding: str) -> None:
    """Compute the input embedding and the head of a tied base now; untie the output when they differ."""
    touched = any(item.adapter.touches(embedding) or item.adapter.touches(HEAD) for item in plan.adapters)
    if not touched:
        return
    import torch

    shared = plan.checkpoint.read(embedding)
    embedded = merged_tensor(embedding, shared, plan)
    head = merged_tensor(HEAD, shared, plan, rows_from=embedding)
    plan.precomputed[embedding] = embedded
    if torch.equal(embedded, head):
        return
    plan.untied = True
    plan.precomputed[HEAD] = head
    spec = next(s for s in plan.specs if s.name == embedding)
    plan.specs.append(TensorSpec(HEAD, spec.shape, spec.dtype))
    plan.sources[HEAD] = embedding
    plan.changed.add(HEAD)


def merged_tensor(name: str, weight: "torch.Tensor", plan: AdapterMergePlan, *,
                  rows_from: str | None = None) -> "torch.Tensor":
    """Tensor ``name`` after every adapter, in float32, from the base's ``weight``.

    ``rows_from`` names the input embedding when ``name`` is the head of a tied base: trainable-token rows of
    the embedding apply to the head too unless the adapter has rows of its own for it (PEFT ties them).
    """
    original = weight
    if plan.quant is not None and is_quantized_weight(name, tuple(weight.shape), plan.quant):
        original = dequantized(weight, plan.quant)
    current = original.float()
    for item in plan.adapters:
        current = item.adapter.apply(name, current, strength=item.weight, original=original)
        if rows_from is not None and name not in item.adapter.token_rows:
            current = item.adapter.write_token_rows(name, current, rows_of=rows_from)
    return current


def _is_plain_update(name: str, plan: AdapterMergePlan) -> bool:
    """Whether ``name`` only gets low-rank updates added (no DoRA, replacement, token rows, bias, rounding)."""
    if plan.quant is not None and is_quantized_weight(name, plan.checkpoint.info(plan.sources[name]).shape, plan.quant):
        return False
    for item in plan.adapters:
        adapter = item.adapter
        module = adapter.targets.get(name)
        if (module is not None and module.is_dora) or name in adapter.replacements or name in adapter.token_rows \
                or name in adapter.bias_updates:
            return False
    return True


def add_updates_by_rows(name: str, weight: "torch.Tensor", plan: AdapterMergePlan,
                        out_dtype: "torch.dtype") -> "torch.Tensor":
    """``W' = W + sum_k w_k s_k B_k @ A_k`` computed a block of rows at a time in float32 and cast once.

    The (out x in) update is never formed: each block of rows gets ``addmm(W_rows, B_rows, A)`` (for a layer
    stored (in x out), ``addmm(W_rows, A^T_rows, B^T)``), so the float32 scratch is one block, not a tensor.
    """
    import torch

    updates = []
    for item in plan.adapters:
        module = item.adapter.targets.get(name)
        if module is None:
            continue
        a, b = item.adapter.factors(name)
        left, right = (a.T.contiguous(), b.T) if module.transposed else (b, a)
        updates.append((left, right, item.weight * module.scale))
    out = torch.empty(weight.shape, dtype=out_dtype)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    scratch = _scratch(rows * weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        count = min(rows, weight.shape[0] - start)
        block = scratch[: count * weight.shape[1]].view(count, weight.shape[1])
        block.copy_(weight[start:start + count])
        for left, right, alpha in updates:
            block.addmm_(left[start:start + count], right, alpha=alpha)
        _check_finite(name, block)
        out[start:start + count] = block
    return out


_THREAD_SCRATCH = threading.local()


def _scratch(elements: int) -> "torch.Tensor":
    """This thread's float32 work buffer of at least ``elements`` (kept between tensors: no fresh pages)."""
    import torch

    buffer = getattr(_THREAD_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < elements:
        buffer = _THREAD_SCRATCH.buffer = torch.empty(max(elements, ROW_BLOCK_ELEMENTS), dtype=torch.float32)
    return buffer


def _check_finite(name: str, tensor: "torch.Tensor") -> None:
    require_finite(tensor, name, fix="check the adapter for NaN/Inf values and the --weights")


def _produce(plan: AdapterMergePlan, spec: TensorSpec) -> "torch.Tensor":
    """The output tensor ``spec.name`` in its output dtype."""
    if spec.name in plan.precomputed:
        result = plan.precomputed.pop(spec.name)
    else:
        weight = plan.checkpoint.map(plan.sources[spec.name])
        if spec.name not in plan.changed:
            return weight.to(spec.dtype)
        if weight.dim() == 2 and _is_plain_update(spec.name, plan):
            return add_updates_by_rows(spec.name, weight, plan, spec.dtype)
        result = merged_tensor(spec.name, weight, plan)
    _check_finite(spec.name, result)
    return result.to(spec.dtype)


def _output_config(plan: AdapterMergePlan, options: AdapterMergeOptions) -> dict:
    config = dict(plan.config)
    if plan.untied:
        config["tie_word_embeddings"] = False
    if options.dtype is not None:
        set_config_dtype(config, options.dtype)
    return config


@dataclass(frozen=True)
class AdapterMergeReport:
    output: Path
    seconds: float
    tensors: int
    changed: int
    untied: bool


def merge_adapters(base: str, adapters: list[str], output: str | os.PathLike,
                   options: AdapterMergeOptions = AdapterMergeOptions(), *,
                   hasher: FileHasher | None = None) -> AdapterMergeReport:
    """Merge ``adapters`` into ``base`` and write the full model to ``output`` (atomically)."""
    started = time.perf_counter()
    hasher = hasher or FileHasher.default()
    plan = plan_adapter_merge(base, adapters, options)
    inputs = [plan.checkpoint.folder] + [item.ref.path for item in plan.adapters]
    metadata = {"mtool_operation": "adapter-merge"}
    needed = planned_bytes(plan.specs, max_shard_bytes=options.max_shard_bytes, metadata=metadata, in_order=True) \
        + support_files_bytes(plan.checkpoint.folder) + RECORD_ALLOWANCE
    with atomic_output_dir(output, force=options.force, inputs=inputs, needed_bytes=needed) as staging:
        parents = describe_parents_in_background(  # hashing overlaps the merge
            [ParentInput(plan.base, "base")]
            + [ParentInput(item.ref, "adapter", item.weight) for item in plan.adapters],
            hasher)
        stream = Stream(jobs=plan.specs, name=lambda spec: spec.name, prepare=lambda spec: _produce(plan, spec),
                        produce=lambda spec, tensor: [(0, tensor.reshape(-1))],
                        held_bytes=lambda spec: spec.nbytes * (2 if spec.name in plan.changed else 1))
        with CheckpointWriter(staging, plan.specs, max_shard_bytes=options.max_shard_bytes, in_order=True,
                              metadata=metadata) as writer:
            stream_tensors(stream, writer, limits=ADAPTER_MERGE_LIMITS, description="merge adapter")
        copy_support_files(plan.checkpoint.folder, staging, config=True, tokenizer=True)
        write_json(staging / "config.json", _output_config(plan, options))
        record = Lineage(
            operation="adapter-merge",
            method="dora" if any(item.adapter.use_dora for item in plan.adapters) else "lora",
            parents=parents.result(),
            parameters={
                "weights": [item.weight for item in plan.adapters],
                "dtype": None if options.dtype is None else dtype_label(options.dtype),
                "dequantized_base": None if plan.quant is None else plan.quant.describe(),
                "untied_embeddings": plan.untied,
            },
            parameter_count=plan.checkpoint.parameter_count() + (plan.checkpoint.info(plan.sources[HEAD]).numel
                                                                 if plan.untied else 0),
        )
        finish_output(staging, record, hasher=hasher, digests=writer.digests)
    seconds = time.perf_counter() - started
    return AdapterMergeReport(Path(output), seconds, len(plan.specs), len(plan.changed), plan.untied)
