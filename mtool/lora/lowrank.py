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


def dora_weight(weight: "torch.Tensor", delta: "torch.Tensor", magnitude: "torch.Tensor", *, transposed: bool,
                original: "torch.Tensor | None" = None) -> "torch.Tensor":
    """``W' = m / ||W0 + dW|| * (W + dW)`` with the norm per output feature (float32).

    ``W0`` is ``original`` (default ``W``): when several adapters are merged in turn ``W`` already holds the
    earlier ones, but PEFT takes DoRA's norm from the unmerged base. ``transposed`` says the tensors are laid
    out (in x out) (fan_in_fan_out layers, embeddings): the norm is then over dim 0 and ``m`` scales columns;
    otherwise over dim 1 and ``m`` scales rows.
    """
    norm_dim = 0 if transposed else 1
    norm = ((weight if original is None else original).float() + delta).norm(p=2, dim=norm_dim)
    factor = magnitude.float() / norm
    factor = factor.view(1, -1) if transposed else factor.view(-1, 1)
    return factor * (weight.float() + delta)


class LowRank(NamedTuple):
    """``B @ A`` approximating a matrix: ``a`` is (r x in), ``b`` is (out x r)."""

    a: "torch.Tensor"
    b: "torch.Tensor"


class ThinSvd(NamedTuple):
    """``M = U diag(S) Vh`` with ``S`` sorted descending."""

    u: "torch.Tensor"
    s: "torch.Tensor"
    vh: "torch.Tensor"

    def factors(self, rank: int) -> LowRank:
        """The best rank-``r`` approximation ``B @ A`` (Eckart-Young), the singular values split evenly between
        the factors so neither is badly scaled: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``. ``rank`` is
        clipped to the number of singular values."""
        rank = max(1, min(rank, self.s.numel()))
        root = self.s[:rank].sqrt()
        return LowRank(a=(root.unsqueeze(1) * self.vh[:rank]).contiguous(),
                       b=(self.u[:, :rank] * root).contiguous())


def thin_svd(matrix: "torch.Tensor") -> ThinSvd:
    """The thin SVD of a dense matrix, in float32."""
    import torch

    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return ThinSvd(u, s, vh)


def product_svd(a: "torch.Tensor", b: "torch.Tensor") -> ThinSvd:
    """The thin SVD of ``B @ A`` without forming the (out x in) product.

    With ``A^T = Q_a R_a`` and ``B = Q_b R_b`` (QR): ``B @ A = Q_b (R_b R_a^T) Q_a^T``; the SVD of the small
    (r x r) core ``U' S V'^T`` gives ``U = Q_b U'``, ``Vh = V'^T Q_a^T``.
    """
    import torch

    q_b, r_b = torch.linalg.qr(b.float())
    q_a, r_a = torch.linalg.qr(a.float().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return ThinSvd(q_b @ u, s, vh @ q_a.T)


def rank_for_energy(values: "torch.Tensor", energy: float) -> int:
    """The smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)``: the rank that keeps that fraction of the
    squared Frobenius norm."""
    import torch

    squares = values.double().square()
    total = float(squares.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    found = int(torch.searchsorted(cumulative, torch.tensor([energy - 1e-12], dtype=cumulative.dtype)).item()) + 1
    return min(found, values.numel())


def truncation_energy(values: "torch.Tensor", rank: int) -> tuple[float, float]:
    """``(sum_{k >= r} s_k^2, sum_k s_k^2)``: the squared Frobenius norms of what a rank-``r`` truncation drops
    and of the whole matrix (Eckart-Young: the error of the best rank-r approximation)."""
    squares = values.double().square()
    return float(squares[rank:].sum()), float(squares.sum())
