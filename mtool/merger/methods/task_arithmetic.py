"""Task-vector methods: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA (and their linear/TIES variants).

All of them work on task vectors ``delta_i = W_i - W_base``, in the dtype of the inputs as mergekit does
(bfloat16 for bfloat16 models: every step below rounds to it), or in float32 with ``mtool: {math: float32}``:

1. sparsify each delta (TIES: magnitude top-k; DARE: Bernoulli; breadcrumbs: magnitude band; DELLA:
   rank-dependent Bernoulli; see :mod:`~mtool.merger.methods.sparsify`), optionally rescaled to keep its L1 norm;
2. weight them: ``d_i = w_i * delta_i`` with ``w_i`` rounded to that dtype;
3. with sign consensus (the TIES variants) keep, per entry, only the ``d_i`` whose sign agrees with the
   sign of ``sum_i d_i`` (an entry of sum 0 counts as positive; a zero ``d_i`` agrees with neither):
   ``m_i = [sign(d_i) == elected]``;
4. ``mixed = sum_i m_i d_i``, divided by ``sum_i m_i w_i`` (or ``sum_i w_i`` without consensus; a divisor of 0,
   or below 1e-8 in size without consensus, counts as 1) when ``normalize``; sums over the models accumulate
   in float32 and round once, as torch's do;
5. ``W = W_base + lambda * mixed``.

TIES, task arithmetic and DARE stream chunk by chunk: a statistics pass over the tensor finds each model's kept
entries (TIES: the exact top-k set; DARE: the keep masks and L1 sums), then each chunk is finished on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from mtool.errors import ConfigError
from mtool.merger.methods import sparsify
from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope, TensorChunks
from mtool.merger.methods.selection import KeptByMagnitude, scratch, top_k_by_magnitude


class Sparsification(enum.Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    MAGNITUDE_OUTLIERS = "magnitude_outliers"
    DELLA = "della_magprune"


@dataclass(frozen=True)
class TaskVectorOptions:
    """How one member of the family sparsifies and combines (see the module docstring)."""

    sparsification: Sparsification
    consensus: bool


def sum_over_models(stacked: torch.Tensor) -> torch.Tensor:
    """``sum`` over dim 0 as torch computes it: 16-bit values accumulate in float32 and round once."""
    return stacked.sum(dim=0)


def combine_task_vectors(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], *, consensus: bool,
                         normalize: bool, scale: float) -> torch.Tensor:
    """Steps 2-5 of the module docstring on (sparsified) deltas, in ``base``'s dtype. The agreement masks are
    made with arithmetic (``sign(d_i elected)`` clamped at 0: 1 where the signs agree, 0 elsewhere and for a zero
    ``d_i``), which gives the same values as comparisons and runs several times faster on a CPU."""
    dtype = base.dtype
    weight = torch.tensor(weights, dtype=dtype, device=base.device).reshape(-1, *([1] * base.dim()))
    weighted = torch.stack(deltas).mul_(weight)
    if consensus:
        # copysign(1, sum) is -1 for a sum of -0.0, which only zero deltas give: they agree with neither sign
        elected = torch.ones_like(base).copysign_(sum_over_models(weighted))
        agrees = (weighted * elected).sign_().clamp_(min=0)
        divisor = sum_over_models(agrees * weight)
        divisor.add_(1 - divisor.abs().sign_())  # a zero divisor counts as 1
        mixed = sum_over_models(agrees.mul_(weighted))
    else:
        mixed = sum_over_models(weighted)
        divisor = sum_over_models(weight)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return (base + mixed).to(dtype)


@dataclass(frozen=True)
class MemberState:
    """What sparsifying one task vector chunk by chunk needs: the magnitude selection (TIES), the keep masks
    drawn while preparing (DARE, by chunk offset) and the L1 rescale factor (None: no rescale)."""

    kept: KeptByMagnitude | None = None
    masks: dict[int, torch.Tensor] | None = None
    rescale: torch.Tensor | None = None


def _magnitude_mask(delta: torch.Tensor, kept: KeptByMagnitude, offset: int) -> torch.Tensor:
    """1 where the selection keeps an entry of this chunk, else 0, in ``delta``'s dtype (``sign(|d| - threshold)
    + 1`` clamped at 1: the threshold is one of the magnitudes, so the difference is exact)."""
    if kept.threshold is None:
        return torch.ones_like(delta)
    if kept.threshold == float("inf"):
        return torch.zeros_like(delta)
    mask = (delta.abs() - kept.threshold).sign_().add_(1).clamp_(max=1)
    dropped = kept.dropped_in(offset, delta.numel())
    if dropped.size:
        mask[torch.from_numpy(dropped).to(mask.device)] = 0
    return mask


def _random_mask(delta: torch.Tensor, density: float, state: MemberState, *, seed: int | None, position: int,
                 offset: int) -> torch.Tensor:
    if state.masks is not None and offset in state.masks:
        return state.masks[offset]
    work = sparsify.random_work_dtype(delta.dtype)
    probability = sparsify.rounded_probability(density, work)
    return sparsify.position_keep_mask(seed or 0, position, offset, delta.numel(), probability).to(delta.device)


def _sparsified(delta: torch.Tensor, density: float, state: MemberState, options: TaskVectorOptions, *,
                seed: int | None, position: int, offset: int) -> torch.Tensor:
    """One chunk of a sparsified (and rescaled) task vector, in ``delta``'s dtype."""
    if options.sparsification is Sparsification.MAGNITUDE and state.kept is not None:
        kept = delta * _magnitude_mask(delta, state.kept, offset)
        return kept if state.rescale is None else kept * state.rescale
    if options.sparsification is Sparsification.RANDOM and density < 1:
        work = sparsify.random_work_dtype(delta.dtype)
        mask = _random_mask(delta, density, state, seed=seed, position=position, offset=offset)
        kept = delta.to(work) * mask.to(work)
        return (kept if state.rescale is None else kept * state.rescale).to(delta.dtype)
    return delta


def prepare_task_vectors(tensor: TensorChunks, options: TaskVectorOptions) -> list[MemberState]:
    """Per model: TIES' kept entries (the ``max(1, floor(density n))`` largest ``|delta|``, torch's tie order),
    DARE's keep masks, and with ``rescale`` the factor ``||delta||_1 / ||kept||_1``, streamed over the tensor's
    chunks (the magnitudes of one model are the only whole-tensor copy)."""
    members = [i for i in range(tensor.input_count) if i != tensor.base_index]
    densities = [float(tensor.model_params[index].get("density", 1.0)) for index in members]
    selections: list[KeptByMagnitude | None] = [None] * len(members)
    if options.sparsification is Sparsification.MAGNITUDE:
        selections = [_magnitude_selection(tensor, index, density) for index, density in zip(members, densities)]
    rescaled = [position for position, density in enumerate(densities)
                if tensor.params["rescale"] and options.sparsification is not Sparsification.NONE and density < 1]
    if not rescaled:
        return [MemberState(kept=kept) for kept in selections]
    work = sparsify.random_work_dtype(tensor.compute_dtype) \
        if options.sparsification is Sparsification.RANDOM else tensor.compute_dtype
    before, after = [0.0] * len(members), [0.0] * len(members)
    masks: list[dict[int, torch.Tensor]] = [{} for _ in members]
    drawing = [MemberState(kept=kept) for kept in selections]
    for chunk in tensor.chunks():
        base = chunk.input(tensor.base_index)
        for position in rescaled:
            delta = chunk.input(members[position]) - base
            if options.sparsification is Sparsification.RANDOM:
                mask = _random_mask(delta, densities[position], drawing[position], seed=tensor.seed,
                                    position=position, offset=chunk.offset)
                masks[position][chunk.offset] = mask  # drawn once: finishing the chunk reuses it (a byte an entry)
                magnitude = delta.to(work).abs_()  # chunk sums in float32 (pairwise), the totals in float64
                before[position] += float(magnitude.sum(dtype=torch.float32))
                after[position] += float(magnitude.mul_(mask).sum(dtype=torch.float32))
                continue
            kept = _sparsified(delta, densities[position], drawing[position], options, seed=tensor.seed,
                               position=position, offset=chunk.offset)
            before[position] += float(delta.to(work).abs().sum(dtype=torch.float64))
            after[position] += float(kept.to(work).abs().sum(dtype=torch.float64))
    return [MemberState(kept=kept, masks=masks[position] or None,
                        rescale=sparsify.rescale_factor(before[position], after[position], work)
                        if position in rescaled else None)
            for position, kept in enumerate(selections)]


def _magnitude_selection(tensor: TensorChunks, index: int, density: float) -> KeptByMagnitude:
    """TIES: which entries of ``W_index - W_base`` are kept (see :func:`prepare_task_vectors`)."""
    count = tensor.numel
    if density >= 1:
        return KeptByMagnitude.everything()
    if density <= 0 or count == 0:
        return KeptByMagnitude.nothing()
    sixteen_bits = tensor.compute_dtype in (torch.bfloat16, torch.float16)
    magnitudes = scratch("magnitudes", count, np.uint16 if sixteen_bits else np.float32)
    for chunk in tensor.chunks():
        piece = (chunk.input(index) - chunk.input(tensor.base_index)).abs().cpu()
        values = piece.view(torch.int16).numpy().view(np.uint16) if sixteen_bits else piece.float().numpy()
        magnitudes[chunk.offset:chunk.offset + piece.numel()] = values
    return top_k_by_magnitude(magnitudes, max(1, int(density * count)), tensor.compute_dtype)


def finish_task_vectors(task: MergeTask, states: list[MemberState], options: TaskVectorOptions) -> torch.Tensor:
    """One chunk: sparsify each delta with its prepared state, weight, combine (steps 1-5)."""
    base = task.base
    deltas, weights = [], []
    for position, ((tensor, params), state) in enumerate(zip(task.non_base(), states)):
        deltas.append(_sparsified(tensor - base, float(params.get("density", 1.0)), state, options,
                                  seed=task.seed, position=position, offset=task.offset))
        weights.append(float(params["weight"]))
    if not deltas:
        return base.clone()
    return combine_task_vectors(base, deltas, weights, consensus=options.consensus,
                                normalize=bool(task.params["normalize"]), scale=float(task.params["lambda"]))


def ranked_task_vector_merge(task: MergeTask, options: TaskVectorOptions) -> torch.Tensor:
    """Breadcrumbs and DELLA, whose masks depend on ranks over the whole tensor (or row): whole tensors."""
    base = task.base
    deltas, weights = [], []
    rescale = bool(task.params["rescale"])
    for tensor, params in task.non_base():
        delta = tensor - base
        density = float(params.get("density", 1.0))
        if options.sparsification is Sparsification.MAGNITUDE_OUTLIERS:
            delta = sparsify.magnitude_outliers(delta, density, float(params["gamma"]), rescale=rescale)
        else:
            delta = sparsify.della_magprune(delta, density, float(params["epsilon"]), generator=task.generator,
                                            rescale=rescale)
        deltas.append(delta)
        weights.append(float(params["weight"]))
    if not deltas:
        return base.clone()
    return combine_task_vectors(base, deltas, weights, consensus=options.consensus,
                                normalize=bool(task.params["normalize"]), scale=float(task.params["lambda"]))


def task_vector_scratch(numel: int, inputs: int, compute_itemsize: int) -> int:
    """Memory :func:`prepare_task_vectors` may hold beyond the chunks: TIES' magnitudes of one model (in 16-bit
    or float32 keys) and their uint32 positions, plus a boolean pass over them; DARE's keep masks (a byte an
    entry and model)."""
    return (4 + max(compute_itemsize, 2) + 1) * numel + numel * (inputs - 1)


def _della_window_check(shared: dict, per_model: list[dict], where: str) -> None:
    for params in per_model:
        density, epsilon = params.get("density"), params.get("epsilon")
        if density is None or epsilon is None or density >= 1 or density <= 0:
            continue
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ConfigError(f"DELLA needs density +/- epsilon inside (0, 1); got density {density:g}, "
                              f"epsilon {epsilon:g}", where=where, fix="lower epsilon")


def _bernoulli_check(shared: dict, per_model: list[dict], where: str) -> None:
    for params in per_model:
        density = params.get("density")
        if density is not None and density < 0:
            raise ConfigError(f"DARE keeps each entry with probability density; got density {density:g}",
                              where=where, fix="use a density in [0, 1]")


def _family_member(name: str, sparsification: Sparsification, consensus: bool, normalize: bool, rescale: bool,
                   description: str, reference: str) -> MergeMethod:
    parameters = [
        ParameterSpec("int8_mask", bool, Scope.SHARED, False, help="accepted for compatibility; no effect on results"),
        ParameterSpec("normalize", bool, Scope.SHARED, normalize, help="divide by the sum of the (kept) weights"),
        ParameterSpec("rescale", bool, Scope.SHARED, rescale, help="rescale a sparsified delta to its L1 norm"),
        ParameterSpec("lambda", float, Scope.SHARED, 1.0, help="scale of the merged task vector"),
        ParameterSpec("weight", float, Scope.NON_BASE, help="scale of this model's task vector"),
        ParameterSpec("density", float, Scope.NON_BASE, 1.0, 0.0, 1.0, "fraction of the task vector kept"),
    ]
    if sparsification is Sparsification.MAGNITUDE_OUTLIERS:
        parameters.append(ParameterSpec("gamma", float, Scope.NON_BASE, 0.01, 0.0, 1.0,
                                        "fraction of largest-magnitude entries removed"))
    if sparsification is Sparsification.DELLA:
        parameters.append(ParameterSpec("epsilon", float, Scope.NON_BASE, 0.15, 0.0, 1.0,
                                        "spread of keep probabilities around density"))
    options = TaskVectorOptions(sparsification, consensus)
    streamed = sparsification in (Sparsification.NONE, Sparsification.MAGNITUDE, Sparsification.RANDOM)
    checks = {Sparsification.DELLA: (_della_window_check,), Sparsification.RANDOM: (_bernoulli_check,)}
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
        extra_checks=checks.get(sparsification, ()),
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
