"""SCE: select, calculate, erase (Wan et al., FuseChat, https://arxiv.org/abs/2408.07990)."""

from __future__ import annotations

import torch

from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope
from mtool.merger.methods.task_arithmetic import sum_over_models


def sce(base: torch.Tensor, tensors: list[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """``T_i = W_i - base`` (stacked, in the inputs' dtype).

    * select: when ``select_topk < 1``, keep only the ``k = floor(nnz(var) * select_topk)`` entries (float32
      product) whose population variance across models is largest (torch's ``topk``, so its choice among equal
      variances); ``select_topk <= 0`` keeps none;
    * calculate: each model weighs ``w_i = mean(T_i^2) / sum_j mean(T_j^2)`` (uniform when that sum is below 1e-6);
    * erase: TIES sign election, ``m_i = [sign(T_i) == sign(sum_i T_i)]``;
    * ``W = base + sum_i m_i w_i T_i / max(sum_i m_i w_i, 1e-6)``.
    """
    if not tensors:
        return base
    deltas = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        deltas = deltas * variance_selection(deltas, select_topk).unsqueeze(0)
    elected = torch.where(sum_over_models(deltas) >= 0, 1.0, -1.0).to(deltas.dtype)
    agrees = deltas.sign() == elected
    weights = energy_weights(deltas).reshape(-1, *([1] * base.dim())) * agrees
    merged = sum_over_models(deltas * weights)
    return base + merged / torch.sum(weights, dim=0).clamp(min=1e-6)


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """``mean(T_i^2)`` normalized to sum 1 (uniform when the sum is below 1e-6 in size)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def variance_selection(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """A 0/1 mask (the deltas' dtype) of the ``floor(nnz * fraction)`` entries whose variance across models is
    largest."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask
    mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce_merge(task: MergeTask) -> torch.Tensor:
    return sce(task.base, [tensor for tensor, _ in task.non_base()], select_topk=float(task.params["select_topk"]))


SCE = MergeMethod(
    name="sce",
    function=sce_merge,
    parameters=(
        ParameterSpec("int8_mask", bool, Scope.SHARED, False, help="accepted for compatibility; no effect on results"),
        ParameterSpec("select_topk", float, Scope.SHARED, 1.0, 0.0, 1.0, "fraction of highest-variance entries kept"),
    ),
    base=BasePolicy.REQUIRED,
    description="variance selection, energy weights, sign election",
    reference="https://arxiv.org/abs/2408.07990",
)
