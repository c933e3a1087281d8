"""Whether a training run fits its GPU: the usable memory of a device, the verdict on an estimate, and the
changes that make a run fit, each applied on top of the ones before (see :mod:`mtool.train.estimate`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mtool.train.estimate import FRAGMENTATION, GIB, RESERVED_GIB, ConfigEstimate, ModelShape, RunShape, estimate_memory

if TYPE_CHECKING:
    import torch


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


# (flags to suggest, the change, how many times it may be applied), in the order they are tried
SUGGESTION_STEPS: tuple[tuple[str, Callable[[RunShape], RunShape | None], int], ...] = (
    ("--set model.gradient_checkpointing=true",
     lambda r: None if r.gradient_checkpointing else replace(r, gradient_checkpointing=True), 1),
    ("--optimizer adamw_8bit",
     lambda r: replace(r, optimizer="adamw_8bit") if r.optimizer in ("adamw", "paged_adamw") else None, 1),
    ("--quantization nf4", lambda r: replace(r, quantization="nf4") if r.quantization == "none" else None, 1),
    ("pip install 'mtool[liger]' (fused kernels)", lambda r: None if r.liger else replace(r, liger=True), 1),
    ("--batch-size {micro_batch_size} --grad-accum x{accumulation} (same effective batch)", _halve_batch, 3),
    ("--seq-len {seq_len} (longer examples are cut)", _halve_sequence, 2),
)


def suggestions(model: ModelShape, run: RunShape, capacity: int) -> list[Suggestion]:
    """Changes applied one after another (each keeping the earlier ones) until the estimate fits ``capacity``."""
    usable = usable_bytes(capacity)
    found: list[Suggestion] = []
    current = run
    for template, change, repeats in SUGGESTION_STEPS:
        for _ in range(repeats):
            if estimate_memory(model, current).total <= usable:
                return found
            changed = change(current)
            if changed is None:
                break
            current = changed
            accumulation = run.micro_batch_size // current.micro_batch_size  # every halving so far, together
            found.append(Suggestion(template.format(micro_batch_size=current.micro_batch_size, seq_len=current.seq_len,
                                                    accumulation=accumulation),
                                    estimate_memory(model, current).total))
    return found


def fit_report(result: ConfigEstimate, capacity: int | None) -> str:
    """The estimate by part, the verdict against ``capacity`` (when known) and the suggestions that make it fit."""
    estimate = result.estimate
    run = result.run
    lines = [f"memory estimate (peak allocated, {run.micro_batch_size} x {run.seq_len} tokens per micro-batch, "
             f"{'QLoRA ' + run.quantization if run.quantization != 'none' else 'LoRA'} r={run.rank}, "
             f"{'bf16/fp16' if run.compute_bytes == 2 else 'fp32'} compute"
             f"{', gradient checkpointing' if run.gradient_checkpointing else ''}{', Liger' if run.liger else ''}):"]
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
    found = suggestions(result.model, run, capacity)
    for suggestion in found:
        lines.append(f"  try {suggestion.change}: {suggestion.total / GIB:.2f} GiB")
    if not found or found[-1].total > usable:
        lines.append("  even so it does not fit: use a smaller model or a larger GPU")
    return "\n".join(lines)
