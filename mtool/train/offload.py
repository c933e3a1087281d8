"""Offloaded checkpointing: each checkpointed decoder layer's input waits for the backward pass in host memory.

With gradient checkpointing a decoder layer keeps only its inputs for the backward pass, which recomputes the
layer from them; over ``L`` layers that is ``L x tokens x hidden`` values on the accelerator, what dominates
memory at long sequences once the logits are chunked. :class:`ActivationOffloader` is the checkpoint function
of every layer: it runs ``torch.utils.checkpoint`` (non-reentrant) under saved-tensor hooks that move the inputs
the checkpoint keeps (those that carry gradients and are at least ``min_bytes``: the hidden states, not the
shared masks and rotary tables) to pinned host memory.

On CUDA the copies run on a side stream: the device-to-host copy of layer ``i``'s input starts once the
compute stream has produced it and overlaps layer ``i``'s forward (the device memory is handed back to the
allocator when the copy is done, through ``record_stream``); in the backward pass, when layer ``i`` is
recomputed, the host-to-device copy of layer ``i - 1``'s input is already issued, so it overlaps layer ``i``'s
recompute and backward. Device memory then holds about two layer inputs instead of ``L``. On a CPU there is no
device memory to free: the hooks keep the tensors as they are (the checkpointing itself is unchanged), unless
``copy_on_cpu`` asks for a copy anyway (how the tests exercise the bookkeeping without a GPU).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MIN_OFFLOAD_BYTES = 1 << 20


@dataclass(eq=False)
class _Offloaded:
    """A saved tensor parked in host memory, with the events of its copies."""

    host: "torch.Tensor"
    device: "torch.device"
    copied: Any = None  # CUDA event: the device-to-host copy is done
    previous: Any = None  # weak reference to the record packed before this one (unpacked after it)
    prefetched: "torch.Tensor | None" = None
    arrived: Any = None  # CUDA event: the prefetched host-to-device copy is done
    requires_grad: bool = field(default=False)


class ActivationOffloader:
    """Saved-tensor hooks and the checkpoint function that offloads the inputs of checkpointed layers."""

    def __init__(self, *, min_bytes: int = MIN_OFFLOAD_BYTES, copy_on_cpu: bool = False) -> None:
        self.min_bytes = min_bytes
        self.copy_on_cpu = copy_on_cpu
        self._stream: Any = None
        self._last: Any = None  # weak reference to the newest record
        self.offloaded_bytes = 0  # total bytes moved to the host so far (statistics for tests and reports)

    # -- the checkpoint function ------------------------------------------------------------------

    def checkpoint(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.utils.checkpoint.checkpoint(function, *args)`` with the inputs it keeps offloaded."""
        import torch
        from torch.utils.checkpoint import checkpoint

        kwargs.setdefault("use_reentrant", False)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, **kwargs)

    # -- hooks ------------------------------------------------------------------------------------

    def _wanted(self, tensor: "torch.Tensor") -> bool:
        import torch

        if isinstance(tensor, torch.nn.Parameter) or not tensor.requires_grad:
            return False
        if tensor.untyped_storage().nbytes() < self.min_bytes:
            return False
        return tensor.is_cuda or (self.copy_on_cpu and tensor.device.type == "cpu")

    def pack(self, tensor: "torch.Tensor") -> Any:
        import torch

        if not self._wanted(tensor):
            return tensor
        if tensor.is_cuda:
            stream = self._copy_stream(tensor.device)
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            tensor.record_stream(stream)  # the allocator reuses the memory only once the copy is done
        else:
            host, copied = tensor.detach().clone(), None
        record = _Offloaded(host, tensor.device, copied, self._last, requires_grad=tensor.requires_grad)
        self._last = weakref.ref(record)
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return record

    def unpack(self, packed: Any) -> "torch.Tensor":
        if not isinstance(packed, _Offloaded):
            return packed
        tensor = self._arrive(packed)
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None and previous.prefetched is None:
            self._fetch(previous)  # the layer before is recomputed next: its input starts moving now
        return tensor

    # -- copies -----------------------------------------------------------------------------------

    def _copy_stream(self, device: "torch.device") -> Any:
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _fetch(self, record: _Offloaded) -> None:
        import torch

        if record.device.type != "cuda":
            record.prefetched = record.host.clone()
            return
        stream = self._copy_stream(record.device)
        with torch.cuda.stream(stream):
            stream.wait_event(record.copied)
            record.prefetched = record.host.to(record.device, non_blocking=True)
            record.arrived = torch.cuda.Event()
            record.arrived.record(stream)

    def _arrive(self, record: _Offloaded) -> "torch.Tensor":
        import torch

        if record.prefetched is None:
            self._fetch(record)
        tensor, record.prefetched = record.prefetched, None
        if record.device.type == "cuda":
            current = torch.cuda.current_stream(record.device)
            current.wait_event(record.arrived)
            tensor.record_stream(current)
        return tensor


def offload_checkpointed_layers(model: Any, offloader: ActivationOffloader) -> int:
    """Make ``offloader.checkpoint`` the checkpoint function of every checkpointed layer of ``model`` (after
    gradient checkpointing was enabled); returns how many layers use it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = offloader.checkpoint
            count += 1
    return count
