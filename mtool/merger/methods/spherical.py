"""Interpolation on the sphere: SLERP, NuSLERP, Multi-SLERP and the Karcher mean."""

from __future__ import annotations

import math

import torch

from mtool.errors import ComputeError
from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope

SLERP_DOT_THRESHOLD = 0.9995


def slerp_statistics(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``[|v0|^2, |v1|^2, <v0, v1>]``, returned in float64: the sums SLERP needs, additive over chunks."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    return torch.stack([a @ a, b @ b, a @ b]).double()


def slerp_coefficients(t: float, statistics: torch.Tensor, *, dot_threshold: float = SLERP_DOT_THRESHOLD,
                       eps: float = 1e-8) -> tuple[float, float]:
    """The weights of v0 and v1: with ``cos(theta) = <v0, v1> / (|v0| |v1|)`` (a norm below ``eps`` counts as 1),
    clamped to [-1, 1], ``(sin((1-t) theta), sin(t theta)) / sin(theta)``; ``(1 - t, t)`` when
    ``|cos(theta)| > dot_threshold`` (near-parallel or antiparallel: plain lerp)."""
    norm_a, norm_b, dot = math.sqrt(statistics[0]), math.sqrt(statistics[1]), float(statistics[2])
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, treated as flat vectors:
    ``c0 * v0 + c1 * v1`` with the coefficients of :func:`slerp_coefficients`. They apply to the unnormalized
    tensors, so norms interpolate too."""
    c0, c1 = slerp_coefficients(t, slerp_statistics(v0, v1), dot_threshold=dot_threshold, eps=eps)
    return torch.add(v0 * c0, v1, alpha=c1)


def _slerp_pair(task: MergeTask) -> tuple[torch.Tensor, torch.Tensor]:
    return task.base, task.inputs[1 - task.base_index]


def slerp_merge(task: MergeTask) -> torch.Tensor:
    """SLERP from the base (t = 0) to the other model (t = 1)."""
    return slerp(float(task.params["t"]), *_slerp_pair(task))


def _slerp_finish(task: MergeTask, statistics: torch.Tensor) -> torch.Tensor:
    v0, v1 = _slerp_pair(task)
    c0, c1 = slerp_coefficients(float(task.params["t"]), statistics)
    return torch.add(v0 * c0, v1, alpha=c1)


SLERP = MergeMethod(
    name="slerp",
    function=slerp_merge,
    parameters=(ParameterSpec("t", float, Scope.SHARED, help="0 = base model, 1 = the other model",
                              advised=(0.0, 1.0)),),
    base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2,
    prepare=lambda tensor: sum(slerp_statistics(*_slerp_pair(chunk.task())) for chunk in tensor.chunks()),
    finish=_slerp_finish,
    description="spherical interpolation between the base and one model",
    reference="https://en.wikipedia.org/wiki/Slerp",
)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool,
            eps: float = 1e-8) -> torch.Tensor:
    """SLERP along vectors of a chosen layout.

    ``flatten``: the whole tensor is one vector. Otherwise each vector runs along the last dimension, or along
    dimension 0 when ``row_wise`` (mergekit's naming). Per vector: ``u = v / max(|v|, 1e-7)``,
    ``cos = <u0, u1>``; colinear when ``1 - cos^2 <= eps^2`` (then ``lerp``); else
    ``(sin((1-t) theta) v0 + sin(t theta) v1) / sin(theta)``.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_merge(task: MergeTask) -> torch.Tensor:
    """NuSLERP between two models with ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0);
    with a base, interpolates the task vectors and adds the base back."""
    (first, first_params), (second, second_params) = task.non_base()
    w0, w1 = float(first_params["weight"]), float(second_params["weight"])
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    options = dict(flatten=bool(task.params["nuslerp_flatten"]), row_wise=bool(task.params["nuslerp_row_wise"]))
    if task.base_index is None:
        return nuslerp(t, first, second, **options)
    base = task.base
    return base + nuslerp(t, first - base, second - base, **options)


NUSLERP = MergeMethod(
    name="nuslerp",
    function=nuslerp_merge,
    parameters=(
        ParameterSpec("weight", float, Scope.NON_BASE, help="relative weight; t = w1 / (w0 + w1)"),
        ParameterSpec("nuslerp_flatten", bool, Scope.SHARED, True, help="treat the tensor as one vector"),
        ParameterSpec("nuslerp_row_wise", bool, Scope.SHARED, False, help="vectors along dim 0 instead of the last"),
    ),
    base=BasePolicy.OPTIONAL, min_non_base=2, max_non_base=2,
    description="SLERP with weights, per row/column or flattened, optionally of task vectors",
)


def multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None, *,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of several (task-)vectors.

    ``x_i`` (minus the base, if any) flattened, ``w`` normalized to sum 1 when asked; ``u_i = x_i/(|x_i|+eps)``;
    ``m = sum w_i u_i / |sum w_i u_i|``; tangent ``t = sum w_i (u_i - <u_i, m> m)``;
    ``r = m cos|t| + t sin|t|/|t|`` (``|t|`` plus eps); result ``r * sum w_i |x_i|`` (+ base). When the weighted
    mean of the unit vectors vanishes, two inputs fall back to ``w_0 x_0 + w_1 x_1``; more inputs are an error.
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(len(tensors), -1)
    w = torch.tensor(weights, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ComputeError("Multi-SLERP: the weighted mean of the inputs is zero (antipodal inputs with "
                               "balancing weights)", fix="change the weights")
        result = stacked[0] * w[0] + stacked[1] * w[1]
        return result + base if base is not None else result
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).reshape(tensors[0].shape)
    return result + base if base is not None else result


def multislerp_merge(task: MergeTask) -> torch.Tensor:
    members = task.non_base()
    base = task.base if task.base_index is not None else None
    return multislerp([t for t, _ in members], [float(p["weight"]) for _, p in members], base,
                      normalize_weights=bool(task.params["normalize_weights"]), eps=float(task.params["eps"]))


MULTISLERP = MergeMethod(
    name="multislerp",
    function=multislerp_merge,
    parameters=(
        ParameterSpec("weight", float, Scope.NON_BASE, help="barycentric weight"),
        ParameterSpec("normalize_weights", bool, Scope.SHARED, True),
        ParameterSpec("eps", float, Scope.SHARED, 1e-8, 0.0),
    ),
    base=BasePolicy.OPTIONAL, min_non_base=1,
    description="barycentric interpolation of any number of models on the hypersphere",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean on the unit sphere, rescaled by the weighted mean norm.

    Units ``u_i = x_i/|x_i|`` of the inputs with ``|x_i| > tol`` (weights renormalized over them);
    start at the normalized weighted mean; iterate ``v = sum a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m)``
    (terms with ``theta_i < tol`` skipped), ``m <- cos|v| m + sin|v| v/|v|``, renormalized, until ``|v| < tol``
    or ``max_iter``. Result ``(sum_i a_i |x_i|) m`` with the original weights.
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    units = [tensors[i] / norms[i] for i in valid]
    mean = sum(w * u for w, u in zip(weights, units))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            cos = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - cos * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher_merge(task: MergeTask) -> torch.Tensor:
    count = len(task.inputs)
    return karcher_mean(list(task.inputs), [1.0 / count] * count, max_iter=int(task.params["max_iter"]),
                        tol=float(task.params["tol"]))


KARCHER = MergeMethod(
    name="karcher",
    function=karcher_merge,
    parameters=(
        ParameterSpec("max_iter", int, Scope.SHARED, 10, 1),
        ParameterSpec("tol", float, Scope.SHARED, 1e-5, 0.0),
    ),
    description="equal-weight Riemannian mean of all models on the hypersphere",
    reference="https://arxiv.org/abs/2603.04972",
)
