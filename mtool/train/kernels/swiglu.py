"""SwiGLU, forward and hand-written backward, elementwise in float32 registers (one pass over memory each).

    forward     h = silu(e) g = e sigmoid(e) g
    backward    de = dh g (sigmoid(e) + silu(e) - silu(e) sigmoid(e))     dg = dh silu(e)     h (recomputed)

The backward writes its three results over its inputs, which the fused MLP no longer needs: ``h`` over ``g``,
``de`` over ``e``, ``dg`` over ``dh`` (the contract of :func:`mtool.train.fused_blocks.swiglu_backward_`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtool.train.kernels import interpreting
from mtool.train.kernels.rounding import round_to_bfloat16


@triton.jit
def _swiglu_forward_kernel(e_ptr, g_ptr, h_ptr, n, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h = e / (1.0 + tl.exp(-e)) * g
    if ROUND_BF16:
        h = round_to_bfloat16(h)
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dh_ptr, e_ptr, g_ptr, n, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-e))
    silu = e * sig
    de = dh * g * (sig + silu - silu * sig)
    h = silu * g
    dg = dh * silu
    if ROUND_BF16:
        de, h, dg = round_to_bfloat16(de), round_to_bfloat16(h), round_to_bfloat16(dg)
    tl.store(g_ptr + offsets, h.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(e_ptr + offsets, de.to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + offsets, dg.to(dh_ptr.dtype.element_ty), mask=mask)


def _emulated_bf16(tensor: torch.Tensor) -> bool:
    """Under the interpreter, round bfloat16 results as a GPU does (see :mod:`.rounding`)."""
    return interpreting() and tensor.dtype == torch.bfloat16


def _block() -> int:
    return 256 if interpreting() else 1024


def swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``silu(e) * g`` in ``e.dtype``."""
    e, g = e.contiguous(), g.contiguous()
    h = torch.empty_like(e)
    n = e.numel()
    _swiglu_forward_kernel[(triton.cdiv(n, _block()),)](e, g, h, n, ROUND_BF16=_emulated_bf16(e), BLOCK=_block())
    return h


def swiglu_backward_inplace(dh: torch.Tensor, e: torch.Tensor,
                            g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, de, dg)``, written over ``g``, ``e`` and ``dh`` (contiguous copies first when they are not)."""
    dh, e, g = dh.contiguous(), e.contiguous(), g.contiguous()
    n = e.numel()
    _swiglu_backward_kernel[(triton.cdiv(n, _block()),)](dh, e, g, n, ROUND_BF16=_emulated_bf16(e),
                                                         BLOCK=_block())
    return g, e, dh
