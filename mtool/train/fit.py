"""Whether a training run fits its GPU: the usable memory of a device, the verdict on an estimate, and the
changes that make a run fit, each applied on top of the ones before (see :mod:`mtool.train.estimate`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mtool.train.estimate import FRAGMENTATION, GIB, RESERVED_GIB, ConfigEstimate, ModelShape, RunShape, estimate_memory

if TYPE_CHECKING:
    import torch


def detected_gpus() -> int:
    """How many CUDA GPUs this machine has (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detected_gpu_memory(device: "torch.device | None" = None) -> int | None:
    """Total memory of the CUDA device in bytes, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
    return torch.cuda.get_device_properties(index).total_memory


def usable_bytes(capacity: int) -> float:
    """What a device of ``capacity`` bytes offers the estimate: minus the CUDA context and allocator slack."""
    return (capacity - RESERVED_GIB * GIB) / (1 + FRAGMENTATION)


# ---------------------------------------------------------------------------------------------------
# Suggestions


@dataclass(frozen=True)
class Suggestion:
    change: str  # what to set, as flags a user can paste
    total: int  # the estimate with this and every earlier suggestion applied


def _halve_batch(run: RunShape) -> RunShape | None:
    return replace(run, micro_batch_size=run.micro_batch_size // 2) if run.micro_batch_size > 1 else None


def _halve_sequence(run: RunShape) -> RunShape | None:
    return replace(run, seq_len=run.seq_len // 2) if run.seq_len > 256 else None


def _chunked_loss(run: RunShape) -> RunShape | None:
    return replace(run, loss="liger" if run.liger else "chunked") if run.loss == "full" else None


def _liger(run: RunShape) -> RunShape | None:
    if run.liger:
        return None
    return replace(run, liger=True, loss="liger" if run.loss != "full" else "full")


def _offload(run: RunShape) -> RunShape | None:
    return replace(run, offload=True) if run.gradient_checkpointing and not run.offload else None


def _shard(run: RunShape, gpus: int) -> RunShape | None:
    if run.fsdp or gpus < 2:
        return None
    return replace(run, fsdp=True, processes=gpus, optimizer="adamw")


# (flags to suggest, the change, how many times it may be applied), in the order they are tried (what costs no
# speed first; sharding and offloading when smaller micro-batches are not enough; shorter sequences last); a
# change sees the run and the number of GPUs at hand
SUGGESTION_STEPS: tuple[tuple[str, Callable[[RunShape, int], RunShape | None], int], ...] = (
    ("--set model.gradient_checkpointing=true",
     lambda r, g: None if r.gradient_checkpointing else replace(r, gradient_checkpointing=True), 1),
    ("--optimizer adamw_8bit",
     lambda r, g: replace(r, optimizer="adamw_8bit") if r.optimizer in ("adamw", "paged_adamw") and not r.fsdp
     else None, 1),
    ("--quantization nf4", lambda r, g: replace(r, quantization="nf4") if r.quantization == "none" else None, 1),
    ("--set model.loss=chunked (no [tokens, vocabulary] logits)", lambda r, g: _chunked_loss(r), 1),
    ("--set model.lean_layers=true", lambda r, g: None if r.lean_layers else replace(r, lean_layers=True), 1),
    ("pip install 'mtool[liger]' (fused kernels)", lambda r, g: _liger(r), 1),
    ("--batch-size {micro_batch_size} --grad-accum x{accumulation} (same effective batch)",
     lambda r, g: _halve_batch(r), 3),
    ("torchrun --nproc_per_node {gpus} -m mtool.cli train ... --set training.parallelism=fsdp --optimizer adamw "
     "(model sharded over {gpus} GPUs)", _shard, 1),
    ("--set model.offload_activations=true (checkpointed layer inputs in host memory)", lambda r, g: _offload(r), 1),
    ("--seq-len {seq_len} (longer examples are cut)", lambda r, g: _halve_sequence(r), 2),
)


def suggestions(model: ModelShape, run: RunShape, capacity: int, *, gpus: int = 1) -> list[Suggestion]:
    """Changes applied one after another (each keeping the earlier ones) until the estimate fits ``capacity``
    (per GPU); sharding with FSDP is suggested when ``gpus`` > 1."""
    usable = usable_bytes(capacity)
    found: list[Suggestion] = []
    current = run
    for template, change, repeats in SUGGESTION_STEPS:
        for _ in range(repeats):
            if estimate_memory(model, current).total <= usable:
                return found
            changed = change(current, gpus)
            if changed is None:
                break
            current = changed
            accumulation = run.micro_batch_size // current.micro_batch_size  # every halving so far, together
            found.append(Suggestion(template.format(micro_batch_size=current.micro_batch_size, seq_len=current.seq_len,
                                                    accumulation=accumulation, gpus=gpus),
                                    estimate_memory(model, current).total))
    return found


def describe_run(run: RunShape) -> str:
    """The memory-relevant settings in words (the estimate's heading)."""
    parts = [f"{run.micro_batch_size} x {run.seq_len} tokens per micro-batch",
             f"{'QLoRA ' + run.quantization if run.quantization != 'none' else 'LoRA'} r={run.rank}",
             f"{'bf16/fp16' if run.compute_bytes == 2 else 'fp32'} compute"]
    if run.gradient_checkpointing:
        parts.append("offloaded checkpointing" if run.offload else "gradient checkpointing")
    if run.lean_layers:
        parts.append("lean layers")
    parts.append({"full": "full logits", "chunked": "chunked loss", "liger": "Liger fused loss"}[run.loss])
    if run.liger:
        parts.append("Liger")
    if run.fsdp:
        parts.append(f"per GPU of {run.processes} under FSDP")
    return ", ".join(parts)


def fit_report(result: ConfigEstimate, capacity: int | None, *, gpus: int = 1) -> str:
    """The estimate by part, the verdict against ``capacity`` (when known) and the suggestions that make it fit."""
    estimate = result.estimate
    run = result.run
    lines = [f"memory estimate (peak allocated, {describe_run(run)}):"]
    for label, value in estimate.parts():
        lines.append(f"  {label:<28} {value / GIB:8.2f} GiB")
    lines.append(f"  {'total':<28} {estimate.total / GIB:8.2f} GiB")
    if capacity is None:
        return "\n".join(lines)
    usable = usable_bytes(capacity)
    if estimate.total <= usable:
        lines.append(f"fits: {capacity / GIB:.1f} GiB device, {usable / GIB:.1f} GiB usable after the CUDA context "
                     f"and allocator slack")
        return "\n".join(lines)
    lines.append(f"does NOT fit: {capacity / GIB:.1f} GiB device, {usable / GIB:.1f} GiB usable")
    found = suggestions(result.model, run, capacity, gpus=gpus)
    for suggestion in found:
        lines.append(f"  try {suggestion.change}: {suggestion.total / GIB:.2f} GiB")
    if not found or found[-1].total > usable:
        lines.append("  even so it does not fit: use a smaller model or a larger GPU")
    return "\n".join(lines)
