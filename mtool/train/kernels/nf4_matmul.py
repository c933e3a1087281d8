"""The QLoRA matmul: a product with a 4-bit (NF4/FP4) bitsandbytes weight, dequantized tile by tile inside the
kernel, with the LoRA term added to the accumulator before the one store.

For ``x`` (``M x Q``), the 4-bit ``W`` (``d_out x d_in``), a low-rank pair ``u`` (``M x r``), ``v`` (``r x P``)
and a scale ``s``::

    forward     out = x W^T + s u v        (Q = d_in, P = d_out; u = x A^T, v = B^T)
    backward    out = x W + s u v          (Q = d_out, P = d_in; x = dy, u = dy B, v = A)

Element ``(p, q)`` of the operand is ``W`` at flat index ``p * stride_p + q * stride_q`` (``(d_in, 1)`` for
``W^T``, ``(1, d_in)`` for ``W``), and is dequantized as bitsandbytes does
(:mod:`mtool.train.frozen_weight`): ``code[nibble] * absmax[index // blocksize]``, with double-quantized
``absmax`` expanded from its byte, its 256-block scale and the offset on the fly. The dequantized tile is
rounded to the compute dtype (bitsandbytes dequantizes to it before its matmul) and multiplied with float32
accumulation; ``s u v`` is added in float32 (PEFT adds its float32 LoRA output the same way) and the sum
rounded once. ``W`` never exists in memory as a whole.

Triton's interpreter mis-multiplies bfloat16 ``tl.dot`` operands and truncates where a GPU rounds to
bfloat16, so under it bfloat16 tiles are rounded as a GPU rounds (:mod:`.rounding`) and multiplied as float32
(float32 inputs are multiplied in IEEE float32 rather than TF32 everywhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from mtool.train.kernels import interpreting
from mtool.train.kernels.rounding import round_to_bfloat16

if TYPE_CHECKING:
    from mtool.train.frozen_weight import LowRank, QuantizedWeight


@triton.jit
def _nf4_matmul_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, u_ptr, v_ptr,
                       out_ptr, M, P, Q, R, stride_xm, stride_xq, stride_wp, stride_wq, stride_um, stride_ur,
                       stride_vr, stride_vp, stride_om, stride_op, scale,
                       BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                       LOW_RANK: tl.constexpr, R_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
                       ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq0 = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        rq = q0 + rq0
        x_mask = (rm[:, None] < M) & (rq[None, :] < Q)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rq[None, :] * stride_xq, mask=x_mask, other=0.0)
        w_mask = (rq[:, None] < Q) & (rp[None, :] < P)
        index = rp[None, :].to(tl.int64) * stride_wp + rq[:, None].to(tl.int64) * stride_wq
        byte = tl.load(packed_ptr + (index >> 1), mask=w_mask, other=0).to(tl.int32)
        nibble = tl.where((index & 1) == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble)
        block = index // BLOCKSIZE
        if NESTED:
            code = tl.load(absmax_ptr + block, mask=w_mask, other=0).to(tl.int32)
            block_scale = tl.load(code2_ptr + code) * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=w_mask,
                                                             other=0.0) + tl.load(offset_ptr)
        else:
            block_scale = tl.load(absmax_ptr + block, mask=w_mask, other=0.0)
        w = value * block_scale
        if ROUND_BF16:
            w = round_to_bfloat16(w)
        w = w.to(x.dtype)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if LOW_RANK:
        rr = tl.arange(0, R_BLOCK)
        u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        v = tl.load(v_ptr + rr[:, None] * stride_vr + rp[None, :] * stride_vp,
                    mask=(rr[:, None] < R) & (rp[None, :] < P), other=0.0)
        acc += scale * tl.dot(u, v, input_precision="ieee")
    if ROUND_BF16:
        acc = round_to_bfloat16(acc)
    out_mask = (rm[:, None] < M) & (rp[None, :] < P)
    tl.store(out_ptr + rm[:, None] * stride_om + rp[None, :] * stride_op, acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


def _blocks(m: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_P, BLOCK_Q, num_warps)``: small tiles under the interpreter (tests), else a plain
    64 x 64 x 64 tiling (to be tuned on a GPU by ``benchmarks/train_bench.py``)."""
    if interpreting():
        return 16, 16, 32, 1
    return (64 if m >= 64 else 16), 64, 64, 4


def nf4_matmul(x: torch.Tensor, weight: "QuantizedWeight", *, transposed: bool,
               low_rank: "LowRank | None" = None) -> torch.Tensor:
    """``x W^T + s u v`` (``transposed=False``) or ``x W + s u v`` (``transposed=True``) for a 2-D ``x``."""
    state = weight.state
    d_out, d_in = weight.shape
    q, p = (d_out, d_in) if transposed else (d_in, d_out)
    if x.dim() != 2 or x.shape[1] != q:
        raise ValueError(f"nf4_matmul: x must be [M, {q}], got {list(x.shape)}")
    m = x.shape[0]
    out = torch.empty((m, p), dtype=x.dtype, device=x.device)
    stride_wp, stride_wq = (1, d_in) if transposed else (d_in, 1)
    nested = bool(state.nested)
    absmax = state.absmax
    absmax2 = state.state2.absmax if nested else absmax
    code2 = state.state2.code if nested else state.code
    offset = state.offset if nested else state.code
    code = state.code.to(device=x.device, dtype=torch.float32)
    if low_rank is not None:
        u, v, scale, r = low_rank.u, low_rank.v, float(low_rank.scale), low_rank.u.shape[1]
    else:
        u, v, scale, r = out, out, 0.0, 0
    block_m, block_p, block_q, warps = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(p, block_p))
    emulated_bf16 = interpreting() and x.dtype == torch.bfloat16
    dot_fp32 = x.dtype == torch.float32 or emulated_bf16
    _nf4_matmul_kernel[grid](
        x, weight.packed_bytes(), code, absmax, absmax2, code2, offset, u, v, out, m, p, q, r,
        x.stride(0), x.stride(1), stride_wp, stride_wq, u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), scale,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.state2.blocksize if nested else 1, NESTED=nested,
        LOW_RANK=low_rank is not None, R_BLOCK=max(16, triton.next_power_of_2(max(r, 1))), DOT_FP32=dot_fp32,
        ROUND_BF16=emulated_bf16, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q, num_warps=warps)
    return out
