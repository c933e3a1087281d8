"""Triton kernels for the lean layers: the 4-bit QLoRA matmul with the low-rank term fused in
(:mod:`.nf4_matmul`) and the SwiGLU activation with its hand-written backward (:mod:`.swiglu`).

They run on CUDA when enabled (``model.kernels: triton``), and anywhere under Triton's interpreter
(``TRITON_INTERPRET=1``, set before the kernels are first imported), which is how the tests run them on a CPU
against float64 references. Every caller has a plain PyTorch path for the same math; :func:`kernels_active`
decides per tensor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_enabled = False


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_enabled(enabled: bool) -> None:
    """Use the kernels (process-wide) for every tensor they can take; see :func:`kernels_active`."""
    global _enabled
    _enabled = bool(enabled) and triton_installed()


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def use_kernels(enabled_now: bool = True) -> Iterator[None]:
    """Within the block, the kernels are on (or off); the previous setting comes back after it."""
    previous = _enabled
    set_enabled(enabled_now)
    try:
        yield
    finally:
        set_enabled(previous)


def kernels_active(tensor: "torch.Tensor") -> bool:
    """Whether an operation on ``tensor`` runs in a Triton kernel: the kernels are enabled and the tensor is on
    CUDA (or Triton interprets kernels on the CPU)."""
    return _enabled and (tensor.is_cuda or (interpreting() and tensor.device.type == "cpu"))
