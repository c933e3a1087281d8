"""Model Stock: interpolate between the base and the average of the fine-tunes by their geometry."""

from __future__ import annotations

import torch

from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """``t = k cos / (1 + (k - 1) cos)`` with ``cos`` the mean pairwise cosine of the offsets ``W_i - W_0``
    (per row when ``filter_wise``, else of the whole flattened tensor; norms clamped at 1e-6) and ``k`` the
    number of fine-tunes; ``W = t * mean_i W_i + (1 - t) * W_0``. Where ``|1 + (k-1) cos| < 1e-6`` the base
    is kept (t = 0)."""
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base, tensors = base.unsqueeze(0), [t.unsqueeze(0) for t in tensors]
    else:
        base, tensors = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [t - base for t in tensors]
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1:]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(tensors)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1, denominator))
    average = sum(tensors) / k
    return (t * average + (1 - t) * base).reshape(shape)


def model_stock_merge(task: MergeTask) -> torch.Tensor:
    return model_stock(task.base, [t for t, _ in task.non_base()], filter_wise=bool(task.params["filter_wise"]))


MODEL_STOCK = MergeMethod(
    name="model_stock",
    function=model_stock_merge,
    parameters=(ParameterSpec("filter_wise", bool, Scope.SHARED, False, help="one ratio per row, not per tensor"),),
    base=BasePolicy.REQUIRED, min_inputs=3,
    description="base-to-average interpolation set by the angle between fine-tunes",
    reference="https://arxiv.org/abs/2403.19522",
)
