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
import math
from dataclasses import dataclass
from functools import partial

import torch

from mtool.merger.methods import sparsify
from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope, TensorChunks
from mtool.merger.methods.sparsify import position_keep_mask


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


def combine_task_vectors(base: torch.Tensor, weighted: list[torch.Tensor], weights: list[float], *,
                         consensus: bool, normalize: bool, scale: float) -> torch.Tensor:
    """Steps 3-5 of the module docstring on weighted deltas ``d_i = weight_i * delta_i`` (sparsified)."""
    if consensus:
        # Arithmetic only: comparisons and torch.where make boolean tensors, 4-30x slower than these on a CPU.
        # copysign(1, sum) is +1 for a sum of +0.0, which is what x + (-x) gives; -1 only for -0.0, a sum of
        # zero deltas only, which agree with neither sign anyway.
        elected = torch.ones_like(base).copysign_(sum(weighted))
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for delta, weight in zip(weighted, weights):
            # 1 where sign(delta) == elected sign, 0 elsewhere (a zero delta agrees with neither)
            agrees = (delta * elected).sign_().clamp_(min=0)
            mixed.addcmul_(delta, agrees)
            divisor.add_(agrees, alpha=weight)
        divisor.add_(1 - divisor.abs().sign_())  # a zero divisor counts as 1
    else:
        mixed = sum(weighted)
        total = sum(weights)
        divisor = 1.0 if abs(total) < 1e-8 else total
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return base + mixed


@dataclass(frozen=True)
class MemberState:
    """What sparsifying one task vector needs beyond its own entries: the magnitude threshold (TIES keeps
    ``|delta| >= threshold``; None keeps all) and the L1 rescale factor (1 without ``rescale``)."""

    threshold: float | None = None
    rescale: float = 1.0
    masks: dict[int, torch.Tensor] | None = None  # random keep masks drawn while preparing, by chunk offset


def _keep_mask(delta: torch.Tensor, density: float, state: MemberState, sparsification: Sparsification, *,
               seed: int | None, position: int, offset: int) -> torch.Tensor | None:
    """Which entries of a (chunk of a) task vector survive, as 1/0 (in the compute dtype, or uint8 for the
    random masks that are kept between passes); None when all do. Built with arithmetic rather than comparisons, whose
    boolean results are several times slower to make and to multiply by on a CPU. Random draws depend on the
    tensor's ``seed``, the model's ``position`` among the task vectors and the chunk's ``offset`` only."""
    if sparsification is Sparsification.MAGNITUDE:
        if state.threshold is None:
            return None
        return (delta.abs() - state.threshold).sign_().add_(1).clamp_(max=1)  # 1 where |delta| >= threshold
    if sparsification is Sparsification.RANDOM and density < 1:
        if state.masks is not None and offset in state.masks:
            return state.masks[offset]
        if density <= 0:
            return torch.zeros_like(delta, dtype=torch.uint8)
        kept = position_keep_mask(seed or 0, position, offset, delta.numel(), density)
        return kept.reshape(delta.shape).to(delta.device)
    return None


def prepare_task_vectors(tensor: TensorChunks, options: TaskVectorOptions) -> list[MemberState]:
    """Per model: the k-th largest ``|delta|`` with ``k = max(1, floor(density n))`` (TIES), and with
    ``rescale`` the factor ``||delta||_1 / ||kept||_1`` (unchanged when either is below 1e-7), streamed over
    the tensor's chunks so no whole float32 copy of an input is ever made (the magnitudes of one model are).

    Thresholds take one pass per model over its input and the base; the rescale factors of all models
    take one more pass together, drawing each random mask once (finishing reuses it)."""
    members = [i for i in range(tensor.input_count) if i != tensor.base_index]
    densities = [float(tensor.model_params[index].get("density", 1.0)) for index in members]
    thresholds: list[float | None] = [None] * len(members)
    if options.sparsification is Sparsification.MAGNITUDE:
        selecting = any(0 < density < 1 for density in densities)  # the models share one scratch buffer
        magnitudes = torch.empty(tensor.numel if selecting else 0, dtype=tensor.compute_dtype, device=tensor.device)
        thresholds = [_magnitude_threshold(tensor, index, density, magnitudes)
                      for index, density in zip(members, densities)]
    rescaled = [position for position, density in enumerate(densities)
                if tensor.params["rescale"] and options.sparsification is not Sparsification.NONE and 0 < density < 1]
    if not rescaled:
        return [MemberState(threshold=threshold) for threshold in thresholds]
    before, after = [0.0] * len(members), [0.0] * len(members)
    masks: list[dict[int, torch.Tensor]] = [{} for _ in members]
    drawing = [MemberState(threshold=threshold) for threshold in thresholds]
    for chunk in tensor.chunks():
        base = chunk.input(tensor.base_index)
        for position in rescaled:
            delta = chunk.input(members[position]) - base
            mask = _keep_mask(delta, densities[position], drawing[position], options.sparsification,
                              seed=tensor.seed, position=position, offset=chunk.offset)
            magnitude = delta.abs_()  # chunk sums in float32 (pairwise), the running totals in float64
            total = float(magnitude.sum())
            before[position] += total
            after[position] += float(magnitude.mul_(mask).sum()) if mask is not None else total
            if options.sparsification is Sparsification.RANDOM and mask is not None:
                masks[position][chunk.offset] = mask  # drawn once: finishing the chunk reuses it (one byte an entry)
    states = []
    for position, threshold in enumerate(thresholds):
        rescale = before[position] / after[position] \
            if position in rescaled and before[position] >= 1e-7 and after[position] >= 1e-7 else 1.0
        states.append(MemberState(threshold=threshold, rescale=rescale, masks=masks[position] or None))
    return states


def _magnitude_threshold(tensor: TensorChunks, index: int, density: float, magnitudes: torch.Tensor) -> float | None:
    """TIES: the k-th largest ``|W_index - W_base|`` over the whole tensor, ``k = max(1, floor(density n))``;
    None when every entry is kept. ``magnitudes`` is scratch space of the tensor's size."""
    if density >= 1:
        return None
    count = tensor.numel
    if density <= 0 or count == 0:
        return math.inf
    for chunk in tensor.chunks():
        piece = (chunk.input(index) - chunk.input(tensor.base_index)).abs_()  # inputs may be views
        magnitudes[chunk.offset:chunk.offset + piece.numel()] = piece
    return float(sparsify.kth_largest(magnitudes, max(1, int(density * count))))


def finish_task_vectors(task: MergeTask, states: list[MemberState], options: TaskVectorOptions) -> torch.Tensor:
    """One chunk: sparsify each delta with its prepared state, weight, combine (steps 1-5)."""
    base = task.base
    weighted, weights = [], []
    for position, ((tensor, params), state) in enumerate(zip(task.non_base(), states)):
        delta = tensor - base
        mask = _keep_mask(delta, float(params.get("density", 1.0)), state, options.sparsification,
                          seed=task.seed, position=position, offset=task.offset)
        if mask is not None:
            delta.mul_(mask)
        weight = float(params["weight"])
        delta.mul_(state.rescale * weight)
        weighted.append(delta)
        weights.append(weight)
    if not weighted:
        return base.clone()
    return combine_task_vectors(base, weighted, weights, consensus=options.consensus,
                                normalize=bool(task.params["normalize"]), scale=float(task.params["lambda"]))


def ranked_task_vector_merge(task: MergeTask, options: TaskVectorOptions) -> torch.Tensor:
    """Breadcrumbs and DELLA, whose masks depend on ranks over the whole tensor (or row): whole tensors."""
    base = task.base
    weighted, weights = [], []
    rescale = bool(task.params["rescale"])
    for tensor, params in task.non_base():
        delta = tensor - base
        density = float(params.get("density", 1.0))
        if options.sparsification is Sparsification.MAGNITUDE_OUTLIERS:
            delta = sparsify.magnitude_outliers(delta, density, float(params["gamma"]), rescale=rescale)
        else:
            delta = sparsify.della_magprune(delta, density, float(params["epsilon"]), generator=task.generator,
                                            rescale=rescale)
        weight = float(params["weight"])
        weighted.append(delta * weight)
        weights.append(weight)
    if not weighted:
        return base.clone()
    return combine_task_vectors(base, weighted, weights, consensus=options.consensus,
                                normalize=bool(task.params["normalize"]), scale=float(task.params["lambda"]))


def task_vector_scratch(numel: int, inputs: int, compute_itemsize: int) -> int:
    """Memory :func:`prepare_task_vectors` may hold beyond the chunks: TIES' magnitudes of one model (the tensor in
    the compute dtype) and about twice that while selecting its threshold; DARE's keep masks (a byte an entry
    and model)."""
    return 3 * numel * compute_itemsize + numel * (inputs - 1)


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
    streamed = sparsification in (Sparsification.NONE, Sparsification.MAGNITUDE, Sparsification.RANDOM)
    return MergeMethod(
        name=name,
        function=None if streamed else partial(ranked_task_vector_merge, options=options),
        prepare=partial(prepare_task_vectors, options=options) if streamed else None,
        finish=partial(finish_task_vectors, options=options) if streamed else None,
        prepare_scratch=task_vector_scratch,
        parameters=tuple(parameters),
        base=BasePolicy.REQUIRED,
        random=sparsification in (Sparsification.RANDOM, Sparsification.DELLA),
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
