"""Measuring a training step: peak allocated memory, the bytes autograd keeps for the backward pass, FLOPs,
and the process's peak resident set. The tests and ``benchmarks/`` use these to hold the estimate and the
memory modes to what they claim.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def measure_peak_bytes(step: Callable[[], Any], resident: list["torch.Tensor"], device: "torch.device") -> int:
    """The measured counterpart of :func:`mtool.train.estimate.estimate_memory`: peak allocated bytes while
    ``step()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated`` around the step. CPU (which keeps no such counter): the bytes of
    the ``resident`` tensors before the step (weights, trainable parameters, optimizer states; each storage
    counted once) plus the highest running sum of the allocations minus frees that the PyTorch profiler
    records during the step.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    storages: dict[int, int] = {}
    for tensor in resident:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return sum(storages.values()) + peak


@dataclass
class SavedTensors:
    """What autograd kept for the backward pass while :func:`count_saved_tensors` was active: the bytes of each
    distinct storage (a tensor saved by several nodes, or views of one storage, count once; parameters and
    buffers, which stay resident anyway, not at all)."""

    storages: dict[int, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


@contextlib.contextmanager
def count_saved_tensors(model: "torch.nn.Module | None" = None) -> Iterator[SavedTensors]:
    """Within the block, record every tensor autograd saves (saved-tensor hooks; under non-reentrant gradient
    checkpointing these are the checkpointed layers' inputs, since the checkpoint keeps nothing else)."""
    import torch

    resident = set()
    if model is not None:
        resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    found = SavedTensors()

    def pack(tensor: "torch.Tensor") -> "torch.Tensor":
        if isinstance(tensor, torch.nn.Parameter) or tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            found.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield found


def count_flops(step: Callable[[], Any]) -> int:
    """Floating-point operations of ``step()`` as ``torch.utils.flop_counter`` counts them (matrix products and
    attention, forward, backward and recomputation), with bitsandbytes' fused 4-bit matmul counted as the
    matrix product it is (``2 M N K``; the counter does not know the op)."""
    import math

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    gemm_4bit = getattr(getattr(torch.ops, "bitsandbytes", None), "gemm_4bit", None)
    if gemm_4bit is not None:
        def gemm_4bit_flops(a_shape: Any, b_shape: Any, shape_b: Any, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
            return 2 * math.prod(a_shape[:-1]) * int(shape_b[0]) * int(shape_b[1])

        custom[gemm_4bit] = gemm_4bit_flops  # the counter looks ops up by their overload packet
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    return counter.get_total_flops()


def process_memory_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory line of ``/proc/<pid>/status`` in bytes (``VmRSS``: resident now, ``VmHWM``: its peak); None
    where there is no such file (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """The process's resident set now (``VmRSS``), after handing freed heap back to the system (glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return process_memory_bytes("VmRSS") or 0


def reset_peak_rss() -> bool:
    """Start a new peak-resident-set measurement (Linux ``/proc/self/clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set since it started or :func:`reset_peak_rss` (``VmHWM``)."""
    peak = process_memory_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
