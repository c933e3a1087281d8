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


@triton.jit
def _swiglu_forward_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h = e * tl.sigmoid(e) * g
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dh_ptr, e_ptr, g_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(e)
    silu = e * sig
    de = dh * g * (sig + silu - silu * sig)
    tl.store(g_ptr + offsets, (silu * g).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(e_ptr + offsets, de.to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + offsets, (dh * silu).to(dh_ptr.dtype.element_ty), mask=mask)


def _block() -> int:
    return 256 if interpreting() else 1024


def swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``silu(e) * g`` in ``e.dtype``."""
    e, g = e.contiguous(), g.contiguous()
    h = torch.empty_like(e)
    n = e.numel()
    _swiglu_forward_kernel[(triton.cdiv(n, _block()),)](e, g, h, n, BLOCK=_block())
    return h


def swiglu_backward_inplace(dh: torch.Tensor, e: torch.Tensor,
                            g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, de, dg)``, written over ``g``, ``e`` and ``dh`` (contiguous copies first when they are not)."""
    dh, e, g = dh.contiguous(), e.contiguous(), g.contiguous()
    n = e.numel()
    _swiglu_backward_kernel[(triton.cdiv(n, _block()),)](dh, e, g, n, BLOCK=_block())
    return g, e, dh
