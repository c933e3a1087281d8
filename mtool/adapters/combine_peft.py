"""PEFT's ``add_weighted_adapter`` combination types, one module at a time (float32).

Each input adapter ``i`` brings, for the module, its factors ``A_i`` (r_i x in), ``B_i`` (out x r_i), its
scale ``s_i`` and its user weight ``w_i``. The combined adapter has scale 1 (``lora_alpha = r``):

* ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]`` (rank sum r_i; exact:
  ``B @ A = sum_i w_i s_i B_i A_i``), zero-padded to the combined rank when the module lacks some adapters.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A's and the B's are merged
  separately with weights ``sign(w_i s_i) sqrt(|w_i s_i|)`` (A) and ``sqrt(|w_i s_i|)`` (B) -- an approximation
  of the weighted sum of updates, needing equal ranks.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the dense updates
  ``dW_i = s_i B_i A_i`` are merged (task arithmetic, TIES, DARE, magnitude pruning with weights ``w_i``), then
  factored by SVD at the new rank: ``B = U_r diag(S_r)``, ``A = Vh_r`` (optionally clamped at a quantile).

The task-vector functions are PEFT's own (``peft.utils.merge_utils``). DARE's random drops draw from a
generator seeded per module, so a result does not depend on the order modules are visited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtool.errors import InputError
from mtool.lora.lowrank import LowRank, lora_delta

if TYPE_CHECKING:
    import torch

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_BASED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
PEFT_COMBINATIONS = ("cat",) + FACTOR_WISE + SVD_BASED
NEEDS_DENSITY = tuple(kind for kind in FACTOR_WISE + SVD_BASED if kind not in ("linear", "svd"))
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


@dataclass(frozen=True)
class Member:
    """One input adapter's part in a module: factors as stored, scale, and the user's weight."""

    a: "torch.Tensor"
    b: "torch.Tensor"
    scale: float
    weight: float
    transposed: bool  # fan_in_fan_out layer or embedding: the base tensor is (in x out)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class Combination:
    kind: str
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None

    def check(self) -> None:
        if self.kind not in PEFT_COMBINATIONS:
            raise InputError(f"unknown combination type {self.kind!r}",
                             fix=f"use one of {', '.join(PEFT_COMBINATIONS)} or merge:<mtool merge method>")
        if self.kind in NEEDS_DENSITY and self.density is None:
            raise InputError(f"combination type {self.kind} needs --density (the fraction of values kept)")
        if self.density is not None and not 0.0 <= self.density <= 1.0:
            raise InputError(f"--density must be in [0, 1], got {self.density}")
        if self.majority_sign_method not in ("total", "frequency"):
            raise InputError(f"--majority-sign-method must be total or frequency, got {self.majority_sign_method!r}")
        if self.svd_clamp is not None and not 0.0 < self.svd_clamp <= 1.0:
            raise InputError(f"--svd-clamp must be a quantile in (0, 1], got {self.svd_clamp}")


def _merge_task_tensors(kind: str, tensors: list["torch.Tensor"], weights: list[float],
                        combination: Combination) -> "torch.Tensor":
    """PEFT's merge_utils function of ``kind`` (the ``_svd`` suffix dropped; ``svd`` is task arithmetic)."""
    import torch
    from peft.utils import merge_utils

    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    base_kind = kind.removesuffix("_svd") if kind != "svd" else "linear"
    if base_kind == "linear":
        return merge_utils.task_arithmetic(tensors, weight_tensor)
    if base_kind == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weight_tensor, combination.density)
    if base_kind == "dare_linear":
        return merge_utils.dare_linear(tensors, weight_tensor, combination.density)
    if base_kind == "ties":
        return merge_utils.ties(tensors, weight_tensor, combination.density, combination.majority_sign_method)
    return merge_utils.dare_ties(tensors, weight_tensor, combination.density, combination.majority_sign_method)


def cat(members: list[Member], rank: int) -> LowRank:
    import torch

    a = torch.cat([m.a * (m.weight * m.scale) for m in members], dim=0)
    b = torch.cat([m.b for m in members], dim=1)
    padding = rank - a.shape[0]
    if padding > 0:
        a = torch.cat([a, a.new_zeros(padding, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], padding)], dim=1)
    return LowRank(a, b)


def factor_wise(members: list[Member], combination: Combination) -> LowRank:
    """Merge the A's and the B's separately (PEFT ``_generalized_task_arithmetic_weighted_adapter``)."""
    if len({m.rank for m in members}) > 1:
        raise InputError(f"combination type {combination.kind} needs adapters of one rank, got ranks "
                         f"{sorted({m.rank for m in members})}", fix="use cat or an _svd type (svd, ties_svd, ...)")
    weights_a, weights_b = [], []
    for member in members:
        scaled = member.weight * member.scale
        root = math.sqrt(abs(scaled))
        weights_a.append(root if scaled >= 0 else -root)
        weights_b.append(root)
    a = _merge_task_tensors(combination.kind, [m.a for m in members], weights_a, combination)
    b = _merge_task_tensors(combination.kind, [m.b for m in members], weights_b, combination)
    return LowRank(a, b)


def svd_based(members: list[Member], combination: Combination, rank: int) -> LowRank:
    """Merge the dense updates, then factor them (PEFT ``_svd_generalized_task_arithmetic_weighted_adapter``)."""
    import torch

    transposed = members[0].transposed
    deltas = [lora_delta(m.a, m.b, m.scale, transposed=m.transposed) for m in members]
    delta = _merge_task_tensors(combination.kind, deltas, [m.weight for m in members], combination)
    if transposed:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b = u[:, :rank] @ torch.diag(s[:rank])
    a = vh[:rank, :]
    if combination.svd_clamp is not None:
        high = quantile(torch.cat([b.flatten(), a.flatten()]), combination.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return LowRank(a.contiguous(), b.contiguous())


def quantile(values: "torch.Tensor", q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) without its input-size limit."""
    import torch

    ordered = torch.sort(values.flatten().double()).values
    position = q * (ordered.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def combine_module(members: list[Member], combination: Combination, rank: int, seed: int) -> LowRank:
    """The combined factors of one module; ``rank`` is the combined adapter's rank (cat, svd types)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # DARE's drops (PEFT draws them from the global generator)
        if combination.kind == "cat":
            return cat(members, rank)
        if combination.kind in FACTOR_WISE:
            return factor_wise(members, combination)
        return svd_based(members, combination, rank)
