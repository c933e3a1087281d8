"""Task-vector methods: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA (and their linear/TIES
variants), and SCE.

All of them work on task vectors ``delta_i = W_i - W_base``:

1. sparsify each delta (TIES: magnitude top-k; DARE: Bernoulli; breadcrumbs: magnitude band; DELLA:
   rank-dependent Bernoulli), optionally rescaled to keep its L1 norm;
2. weight them: ``d_i = weight_i * delta_i``;
3. with sign consensus (the TIES variants) keep, per entry, only the ``d_i`` whose sign agrees with the
   sign of ``sum_i d_i`` (an entry of sum 0 counts as positive): ``m_i = [sign(d_i) == elected]``;
4. ``mixed = sum_i m_i * d_i``, divided by ``sum_i m_i * weight_i`` (or ``sum_i weight_i`` without consensus;
   a zero divisor counts as 1) when ``normalize``;
5. ``W = W_base + lambda * mixed``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import partial

import torch

from mtool.merger.methods import sparsify
from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope


class Sparsification(enum.Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    MAGNITUDE_OUTLIERS = "magnitude_outliers"
    DELLA = "della_magprune"


def sign_consensus_mask(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: ``mask_i = sign(d_i) == (+1 if sum_i d_i >= 0 else -1)`` per entry.

    ``weighted_deltas`` is stacked along dim 0. A zero delta agrees with neither sign and is masked out.
    """
    elected = torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0).to(weighted_deltas.dtype)
    return weighted_deltas.sign() == elected


@dataclass(frozen=True)
class TaskVectorOptions:
    """How one member of the family sparsifies and combines (see the module docstring)."""

    sparsification: Sparsification
    consensus: bool


def sparsify_delta(delta: torch.Tensor, options: TaskVectorOptions, params: dict, *, rescale: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Step 1 for one task vector with its own ``density`` (and ``gamma`` / ``epsilon``)."""
    density = params.get("density", 1.0)
    kind = options.sparsification
    if kind is Sparsification.NONE:
        return delta
    if kind is Sparsification.MAGNITUDE:
        return sparsify.magnitude(delta, density, rescale=rescale)
    if kind is Sparsification.RANDOM:
        return sparsify.bernoulli(delta, density, generator=generator, rescale=rescale)
    if kind is Sparsification.MAGNITUDE_OUTLIERS:
        return sparsify.magnitude_outliers(delta, density, params["gamma"], rescale=rescale)
    return sparsify.della_magprune(delta, density, params["epsilon"], generator=generator, rescale=rescale)


def task_vector_merge(task: MergeTask, options: TaskVectorOptions) -> torch.Tensor:
    """The whole family, steps 1-5 of the module docstring."""
    base = task.base
    members = task.non_base()
    if not members:
        return base.clone()
    deltas = torch.empty((len(members), *base.shape), dtype=base.dtype, device=base.device)
    for index, (tensor, params) in enumerate(members):
        deltas[index] = sparsify_delta(torch.sub(tensor, base), options, params, rescale=bool(task.params["rescale"]),
                                       generator=task.generator)
    weights = torch.tensor([float(params["weight"]) for _, params in members], dtype=base.dtype, device=base.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if options.consensus:
        mask = sign_consensus_mask(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if task.params["normalize"]:
        mixed.div_(divisor)
    if task.params["lambda"] != 1:
        mixed.mul_(task.params["lambda"])
    return mixed.add_(base)


def _della_window_check(shared: dict, per_model: list[dict], where: str) -> None:
    from mtool.errors import ConfigError

    for params in per_model:
        density, epsilon = params.get("density"), params.get("epsilon")
        if density is None or epsilon is None or density >= 1 or density <= 0:
            continue
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ConfigError(f"DELLA needs density +/- epsilon inside (0, 1); got density {density:g}, "
                              f"epsilon {epsilon:g}", where=where, fix="lower epsilon")


def _family_member(name: str, sparsification: Sparsification, consensus: bool, normalize: bool, rescale: bool,
                   description: str, reference: str) -> MergeMethod:
    parameters = [
        ParameterSpec("weight", float, Scope.NON_BASE, help="scale of this model's task vector"),
        ParameterSpec("density", float, Scope.NON_BASE, 1.0, 0.0, 1.0, "fraction of the task vector kept"),
        ParameterSpec("normalize", bool, Scope.SHARED, normalize, help="divide by the sum of the (kept) weights"),
        ParameterSpec("rescale", bool, Scope.SHARED, rescale, help="rescale a sparsified delta to its L1 norm"),
        ParameterSpec("lambda", float, Scope.SHARED, 1.0, help="scale of the merged task vector"),
        ParameterSpec("int8_mask", bool, Scope.SHARED, False, help="accepted for compatibility; no effect on results"),
    ]
    if sparsification is Sparsification.MAGNITUDE_OUTLIERS:
        parameters.append(ParameterSpec("gamma", float, Scope.NON_BASE, 0.01, 0.0, 1.0,
                                        "fraction of largest-magnitude entries removed"))
    if sparsification is Sparsification.DELLA:
        parameters.append(ParameterSpec("epsilon", float, Scope.NON_BASE, 0.15, 0.0, 1.0,
                                        "spread of keep probabilities around density"))
    options = TaskVectorOptions(sparsification, consensus)
    elementwise = sparsification is Sparsification.NONE and not consensus
    return MergeMethod(
        name=name,
        function=partial(task_vector_merge, options=options),
        parameters=tuple(parameters),
        base=BasePolicy.REQUIRED,
        random=sparsification in (Sparsification.RANDOM, Sparsification.DELLA),
        elementwise=elementwise,
        description=description,
        reference=reference,
        extra_checks=(_della_window_check,) if sparsification is Sparsification.DELLA else (),
    )


TASK_ARITHMETIC = _family_member("task_arithmetic", Sparsification.NONE, False, False, False,
                                 "base + lambda * sum_i weight_i (W_i - base)", "https://arxiv.org/abs/2212.04089")
TIES = _family_member("ties", Sparsification.MAGNITUDE, True, True, False,
                      "magnitude trim, sign election, disjoint mean", "https://arxiv.org/abs/2306.01708")
DARE_TIES = _family_member("dare_ties", Sparsification.RANDOM, True, False, True,
                           "random drop + rescale, sign election", "https://arxiv.org/abs/2311.03099")
DARE_LINEAR = _family_member("dare_linear", Sparsification.RANDOM, False, False, True,
                             "random drop + rescale, weighted sum", "https://arxiv.org/abs/2311.03099")
BREADCRUMBS = _family_member("breadcrumbs", Sparsification.MAGNITUDE_OUTLIERS, False, False, False,
                             "drop outliers and small entries, weighted sum", "https://arxiv.org/abs/2312.06795")
BREADCRUMBS_TIES = _family_member("breadcrumbs_ties", Sparsification.MAGNITUDE_OUTLIERS, True, False, False,
                                  "drop outliers and small entries, sign election", "https://arxiv.org/abs/2312.06795")
DELLA = _family_member("della", Sparsification.DELLA, True, True, True,
                       "magnitude-ranked random drop, sign election", "https://arxiv.org/abs/2406.11617")
DELLA_LINEAR = _family_member("della_linear", Sparsification.DELLA, False, False, True,
                              "magnitude-ranked random drop, weighted sum", "https://arxiv.org/abs/2406.11617")


def sce_merge(task: MergeTask) -> torch.Tensor:
    """SCE: select, calculate, erase.

    ``deltas = W_i - base``; when ``select_topk < 1`` keep only the ``floor(select_topk * nnz(var))`` entries
    with the largest variance across models (``var`` population variance over i); TIES sign election on the
    (selected) deltas; each model weighs ``w_i = mean(delta_i^2) / sum_j mean(delta_j^2)`` (uniform when that
    sum is below 1e-6); ``W = base + sum_i m_i w_i delta_i / max(sum_i m_i w_i, 1e-6)``.
    """
    base = task.base
    members = [tensor for tensor, _ in task.non_base()]
    if not members:
        return base.clone()
    deltas = torch.stack([m - base for m in members])
    select_topk = float(task.params["select_topk"])
    if select_topk < 1:
        deltas.mul_(_variance_selection(deltas, select_topk))
    mask = sign_consensus_mask(deltas)
    energy = deltas.square().reshape(len(members), -1).mean(dim=1)
    total = energy.sum().item()
    weights = torch.full_like(energy, 1 / len(members)) if abs(total) < 1e-6 else energy / total
    weights = weights.reshape(-1, *([1] * base.dim())) * mask
    merged = (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)
    return merged.add_(base)


def _variance_selection(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """A 0/1 mask of the ``floor(fraction * nnz)`` entries whose variance across models is largest."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    variance = deltas.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance).item() * fraction)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask
    indices = torch.topk(variance.reshape(-1), k=k).indices
    mask.view(-1)[indices] = 1
    return mask


SCE = MergeMethod(
    name="sce",
    function=sce_merge,
    parameters=(
        ParameterSpec("select_topk", float, Scope.SHARED, 1.0, 0.0, 1.0, "fraction of highest-variance entries kept"),
        ParameterSpec("int8_mask", bool, Scope.SHARED, False, help="accepted for compatibility; no effect on results"),
    ),
    base=BasePolicy.REQUIRED,
    description="variance selection, energy weights, sign election",
    reference="https://arxiv.org/abs/2408.07990",
)
