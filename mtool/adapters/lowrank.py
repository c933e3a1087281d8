"""Low-rank math shared by every adapter command: pure tensor functions, float32 in and out.

Conventions are PEFT's (``peft/tuners/lora/layer.py`` and ``dora.py``):

* A LoRA module has ``A`` (r x in) and ``B`` (out x r); its update of the base weight ``W`` (out x in) is
  ``dW = s * B @ A`` with ``s = alpha / r``, or ``s = alpha / sqrt(r)`` for rsLoRA.
* A layer stored transposed (``fan_in_fan_out``, GPT-2's ``Conv1D``) has ``W`` as (in x out), so
  ``dW = s * (B @ A).T``. Embeddings are always stored that way: ``lora_embedding_A`` is (r x vocab),
  ``lora_embedding_B`` is (dim x r) and ``dW = s * (B @ A).T`` is (vocab x dim).
* DoRA rescales the merged weight per output feature: ``W' = m / ||W + dW|| * (W + dW)`` where the norm is
  taken over the input dimension of the (out x in) view and ``m`` is ``lora_magnitude_vector``. For an
  embedding the "output features" are the embedding dimensions, i.e. the columns of (vocab x dim).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


def lora_scale(alpha: float, rank: int, *, rslora: bool) -> float:
    """``s = alpha / r`` (LoRA) or ``s = alpha / sqrt(r)`` (rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(a: "torch.Tensor", b: "torch.Tensor", scale: float, *, transposed: bool) -> "torch.Tensor":
    """``dW = s * B @ A`` in float32, transposed to (in x out) when the base stores the layer that way."""
    product = b.float() @ a.float()
    if transposed:
        product = product.T.contiguous()
    return product.mul_(scale)


def dora_weight(weight: "torch.Tensor", delta: "torch.Tensor", magnitude: "torch.Tensor", *,
                transposed: bool) -> "torch.Tensor":
    """``W' = m / ||W + dW|| * (W + dW)`` with the norm per output feature (float32).

    ``transposed`` says the tensors are laid out (in x out) (fan_in_fan_out layers, embeddings): the norm is
    then over dim 0 and ``m`` scales columns; otherwise over dim 1 and ``m`` scales rows.
    """
    return dora_weight_with_norm_of(weight, weight, delta, magnitude, transposed=transposed)


def dora_weight_with_norm_of(current: "torch.Tensor", original: "torch.Tensor", delta: "torch.Tensor",
                             magnitude: "torch.Tensor", *, transposed: bool) -> "torch.Tensor":
    """``W' = m / ||W0 + dW|| * (W + dW)``: DoRA applied on top of ``current`` (``W``, which may already hold
    earlier adapters) with the norm taken from the ``original`` base ``W0``, as PEFT does when it merges
    several adapters in turn."""
    norm_dim = 0 if transposed else 1
    norm = (original.float() + delta).norm(p=2, dim=norm_dim)
    factor = magnitude.float() / norm
    factor = factor.view(1, -1) if transposed else factor.view(-1, 1)
    return factor * (current.float() + delta)


class LowRank(NamedTuple):
    """``B @ A`` approximating a matrix: ``a`` is (r x in), ``b`` is (out x r)."""

    a: "torch.Tensor"
    b: "torch.Tensor"


def svd_factors(matrix: "torch.Tensor", rank: int) -> LowRank:
    """The best rank-``r`` approximation ``B @ A`` of ``matrix`` (out x in), by truncated SVD (Eckart-Young).

    With ``M = U S V^T``: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` (the singular values are split evenly
    between the factors so neither is badly scaled). ``rank`` is clipped to ``min(out, in)``.
    """
    import torch

    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    return LowRank(a=(root.unsqueeze(1) * vh[:rank]).contiguous(), b=(u[:, :rank] * root).contiguous())


def rank_for_energy(singular_values: "torch.Tensor", energy: float) -> int:
    """The smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)``: the rank that keeps that fraction of the
    squared Frobenius norm."""
    import torch

    squares = singular_values.double().square()
    total = float(squares.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1


def singular_values(matrix: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.linalg.svdvals(matrix.float())


def lowrank_product_factors(a: "torch.Tensor", b: "torch.Tensor", rank: int) -> LowRank:
    """A rank-``rank`` factorization of ``B @ A`` without forming the (out x in) product.

    With ``A = Q_a R_a^T`` (QR of ``A^T``) and ``B = Q_b R_b``: ``B @ A = Q_b (R_b R_a^T) Q_a^T``, so the SVD of
    the small (r x r) core gives the SVD of the product. Exact when ``rank >= r``.
    """
    import torch

    q_b, r_b = torch.linalg.qr(b.float())
    q_a, r_a = torch.linalg.qr(a.float().T)
    core = r_b @ r_a.T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root.unsqueeze(1) * (vh[:rank] @ q_a.T)
    return LowRank(a=new_a.contiguous(), b=new_b.contiguous())


def relative_error(approximation: "torch.Tensor", target: "torch.Tensor") -> float:
    """``||approximation - target||_F / ||target||_F`` (0 when the target is zero and matched exactly)."""
    norm = float(target.double().norm())
    difference = float((approximation.double() - target.double()).norm())
    if norm == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / norm
