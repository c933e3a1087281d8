"""The frozen base weight of an adapted linear layer: a dense tensor or a 4-bit (NF4/FP4) bitsandbytes weight.

The lean LoRA layers (:mod:`mtool.train.lean_lora`) and the fused blocks (:mod:`mtool.train.fused_blocks`)
need two products with the frozen weight ``W`` (``d_out x d_in``) and nothing else from it:

    forward      y  = x W^T        (x: ``[T, d_in]``)
    backward     dx = dy W         (dy: ``[T, d_out]``)

A 4-bit weight is dequantized for each product and the dequantized copy is dropped at once: it is never kept
for the backward pass. The 4-bit layout is bitsandbytes': the ``d_out * d_in`` codes in row-major order, two
per byte (element ``2i`` in the high nibble of byte ``i``, ``2i + 1`` in the low one); element ``e`` is

    W_e = code[q_e] * absmax[e // blocksize]

with ``code`` the 16 NF4 (or FP4) values, and with double quantization the block scales themselves stored as
bytes: ``absmax[j] = code2[a_j] * absmax2[j // 256] + offset``. The packed bytes may be stored in any dtype
(``bnb_4bit_quant_storage``: a float dtype lets FSDP shard them like any other parameter); they are read as
bytes. On CUDA with the Triton kernels enabled the products run in :mod:`mtool.train.kernels.nf4_matmul`
without materializing ``W``; elsewhere through bitsandbytes' own dequantization and a dense matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """A 4-bit bitsandbytes weight: its packed bytes (any storage dtype) and its ``QuantState``."""

    packed: "torch.Tensor"
    state: Any  # bitsandbytes.functional.QuantState

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.state.shape)

    def packed_bytes(self) -> "torch.Tensor":
        """The packed codes as a flat uint8 tensor (a view, whatever dtype stores them)."""
        import torch

        packed = self.packed if self.packed.dtype == torch.uint8 else self.packed.view(torch.uint8)
        return packed.reshape(-1)

    def block_scales(self) -> "torch.Tensor":
        """``absmax`` as float32, one per block (double quantization undone)."""
        state = self.state
        if not state.nested:
            return state.absmax.float()
        from bitsandbytes.functional import dequantize_blockwise

        return dequantize_blockwise(state.absmax, state.state2) + state.offset


def frozen_weight_of(layer: "torch.nn.Module") -> "torch.Tensor | QuantizedWeight":
    """The weight of a frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` (``layer.weight`` as the module holds
    it now, so an FSDP-gathered weight is seen as gathered)."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None) or getattr(layer, "quant_state", None)
    if state is None or _is_dense(weight, state):
        return weight
    return QuantizedWeight(weight, state)


def _is_dense(weight: "torch.Tensor", state: Any) -> bool:
    return weight.dim() == 2 and tuple(weight.shape) == tuple(state.shape)


def is_quantized(weight: "torch.Tensor | QuantizedWeight") -> bool:
    return isinstance(weight, QuantizedWeight)


def weight_shape(weight: "torch.Tensor | QuantizedWeight") -> tuple[int, int]:
    return weight.shape if isinstance(weight, QuantizedWeight) else tuple(weight.shape)


def dequantize(weight: "torch.Tensor | QuantizedWeight", dtype: "torch.dtype") -> "torch.Tensor":
    """``W`` as a dense ``d_out x d_in`` tensor of ``dtype`` (a dense weight of that dtype is returned as it is:
    never write into the result)."""
    import torch

    if not isinstance(weight, QuantizedWeight):
        return weight.to(dtype)
    from bitsandbytes.functional import dequantize_4bit

    packed = weight.packed_bytes().view(-1, 1)
    state = weight.state
    direct = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    if state.dtype != direct:  # bitsandbytes writes 16/32-bit floats; float64 is the exact float32 product
        state = _with_dtype(state, direct)
    return dequantize_4bit(packed, state).to(dtype)


def _with_dtype(state: Any, dtype: "torch.dtype") -> Any:
    import copy

    changed = copy.copy(state)
    changed.dtype = dtype
    return changed


@dataclass(frozen=True)
class LowRank:
    """A rank-``r`` term ``scale * u @ v`` added to a product with the frozen weight (``u``: ``[T, r]``, ``v``:
    ``[r, n]``, both float32, as PEFT computes its LoRA path)."""

    u: "torch.Tensor"
    v: "torch.Tensor"
    scale: float


def linear(x: "torch.Tensor", weight: "torch.Tensor | QuantizedWeight", bias: "torch.Tensor | None" = None,
           low_rank: LowRank | None = None) -> "torch.Tensor":
    """``x W^T + bias + scale u v`` in ``x.dtype`` (``x``: ``[T, d_in]``). The low-rank term is added in float32
    before the one rounding to ``x.dtype``, as PEFT's ``result + lora_B(lora_A(x)) * scaling`` does."""
    import torch

    from mtool.train.kernels import kernels_active

    if isinstance(weight, QuantizedWeight) and kernels_active(x):
        from mtool.train.kernels.nf4_matmul import nf4_matmul

        out = nf4_matmul(x, weight, transposed=False, low_rank=low_rank)
        return out if bias is None else out + bias.to(out.dtype)
    out = torch.nn.functional.linear(x, dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    return out if low_rank is None else _add_low_rank(out, low_rank)


def linear_transposed(dy: "torch.Tensor", weight: "torch.Tensor | QuantizedWeight",
                      low_rank: LowRank | None = None) -> "torch.Tensor":
    """``dy W + scale u v`` in ``dy.dtype`` (``dy``: ``[T, d_out]``): the input gradient of :func:`linear`."""
    from mtool.train.kernels import kernels_active

    if isinstance(weight, QuantizedWeight) and kernels_active(dy):
        from mtool.train.kernels.nf4_matmul import nf4_matmul

        return nf4_matmul(dy, weight, transposed=True, low_rank=low_rank)
    out = dy @ dequantize(weight, dy.dtype)
    return out if low_rank is None else _add_low_rank(out, low_rank)


def _add_low_rank(out: "torch.Tensor", low_rank: LowRank) -> "torch.Tensor":
    if out.dtype == low_rank.u.dtype:  # one matmul accumulating into out
        return out.addmm_(low_rank.u, low_rank.v, alpha=low_rank.scale)
    return (out.to(low_rank.u.dtype) + (low_rank.u @ low_rank.v) * low_rank.scale).to(out.dtype)
