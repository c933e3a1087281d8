"""Interpolation on the sphere: SLERP, NuSLERP, Multi-SLERP and the Karcher mean."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtool.errors import ComputeError
from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope, TensorChunks

SLERP_DOT_THRESHOLD = 0.9995
SLERP_BLOCK = 1 << 20  # norms and dot products are summed per block of this many entries, then over blocks
SLERP_KEEP_ELEMENTS = 1 << 24  # a tensor this small is read once for both statistics (2 x 64 MiB in float32)


@dataclass(frozen=True)
class SlerpCoefficients:
    """The weights of the base (``first``) and of the other model (``second``): 1-element tensors in the
    compute dtype."""

    first: torch.Tensor
    second: torch.Tensor


def _blocks(vector: torch.Tensor, offset: int):
    """``vector`` (entries ``offset..``) cut at multiples of ``SLERP_BLOCK``, each block as a ``[1, n]`` row."""
    start = 0
    while start < vector.numel():
        end = min(vector.numel(), (offset + start) // SLERP_BLOCK * SLERP_BLOCK + SLERP_BLOCK - offset)
        yield vector[start:end].reshape(1, -1)
        start = end


def slerp_coefficients(t: float, norm_parts: tuple[list, list], dot_parts_of, *,
                       dot_threshold: float = SLERP_DOT_THRESHOLD, eps: float = 1e-8) -> SlerpCoefficients:
    """SLERP's weights, computed as mergekit computes them (float32, float64 for float64 inputs): the norms
    ``|v0|``, ``|v1|`` are the norms of the per-block norms (a norm at or below ``eps`` counts as 1); ``cos =
    sum over blocks of <v0/|v0|, v1/|v1|>`` clamped to [-1, 1] (``dot_parts_of(norm0, norm1)`` gives the blocks'
    sums); ``(sin((1-t) theta), sin(t theta)) / sin(theta)``, or ``(1 - t, t)`` when ``|cos| > dot_threshold``."""
    norm_a = torch.linalg.vector_norm(torch.stack(norm_parts[0]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_parts[1]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack(dot_parts_of(norm_a, norm_b)).sum(dim=0).clamp(-1, 1)
    t_tensor = torch.tensor([t], dtype=dot.dtype).reshape(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    first = torch.where(linear, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin_theta)
    second = torch.where(linear, t_tensor, torch.sin(t_tensor * theta) / sin_theta)
    return SlerpCoefficients(first, second)


def _slerp_pair(task: MergeTask) -> tuple[torch.Tensor, torch.Tensor]:
    return task.base, task.inputs[1 - task.base_index]


def slerp_prepare(tensor: TensorChunks) -> SlerpCoefficients:
    """Two passes over the tensor: the blocks' norms, then the blocks' dot products of the normalized vectors. A
    tensor of at most :data:`SLERP_KEEP_ELEMENTS` entries keeps the first pass's chunks for the second instead of
    reading them again."""
    other = 1 - tensor.base_index
    keep = tensor.numel <= SLERP_KEEP_ELEMENTS
    kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    norms: tuple[list, list] = ([], [])
    for chunk in tensor.chunks():
        first, second = chunk.input(tensor.base_index), chunk.input(other)
        if keep:
            kept.append((chunk.offset, first, second))
        for a, b in zip(_blocks(first, chunk.offset), _blocks(second, chunk.offset)):
            norms[0].append(torch.linalg.vector_norm(a, dim=1, keepdim=True))
            norms[1].append(torch.linalg.vector_norm(b, dim=1, keepdim=True))
    if not norms[0]:
        zero = torch.zeros(1, 1, dtype=tensor.compute_dtype)
        norms = ([zero], [zero])

    def pairs():
        if keep:
            yield from kept
        else:
            for chunk in tensor.chunks():
                yield chunk.offset, chunk.input(tensor.base_index), chunk.input(other)

    def dots(norm_a: torch.Tensor, norm_b: torch.Tensor) -> list:
        parts = []
        for offset, first, second in pairs():
            for a, b in zip(_blocks(first, offset), _blocks(second, offset)):
                parts.append(((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True))
        return parts or [torch.zeros(1, 1, dtype=tensor.compute_dtype)]

    return slerp_coefficients(float(tensor.params["t"]), norms, dots)


def slerp_finish(task: MergeTask, coefficients: SlerpCoefficients) -> torch.Tensor:
    """One chunk: ``first * v0 + second * v1`` (the base is ``v0``)."""
    v0, v1 = _slerp_pair(task)
    shape = v0.shape
    return (coefficients.first * v0.reshape(1, -1) + coefficients.second * v1.reshape(1, -1)).reshape(shape)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, treated as flat vectors (see :func:`slerp_coefficients`; the
    weights apply to the unnormalized tensors, so norms interpolate too)."""
    from mtool.merger.methods.base import WholeTensor

    task = MergeTask(name="slerp", inputs=[v0, v1], model_params=[{}, {}], params={"t": t}, base_index=0)
    return slerp_finish(task, slerp_prepare(WholeTensor(task)))


SLERP = MergeMethod(
    name="slerp",
    parameters=(ParameterSpec("t", float, Scope.SHARED, minimum=0.0, maximum=1.0,
                              help="0 = base model, 1 = the other model (beyond: extrapolation)"),),
    base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2, internal_float32=True,
    prepare=slerp_prepare,
    finish=slerp_finish,
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
               normalize_weights: bool = True, eps: float = 1e-8, name: str = "tensor") -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of several (task-)vectors, in the inputs' dtype.

    ``x_i`` (minus the base, if any) flattened, ``w`` (in that dtype) normalized to sum 1 when asked;
    ``u_i = x_i/(|x_i|+eps)``; ``m = sum w_i u_i / |sum w_i u_i|``; tangent ``t = sum w_i (u_i - <u_i, m> m)``;
    ``r = m cos|t| + t sin|t|/|t|`` (``|t|`` plus eps); result ``r * sum w_i |x_i|`` (+ base). One input is returned
    as it is. When the weighted mean of the unit vectors vanishes, two inputs fall back to ``w_0 x_0 + w_1 x_1``;
    so do more inputs when every ``x_i`` is zero (a tensor no fine-tune changed: the result is the base); other
    cases (antipodal inputs whose weights balance out) are an error naming the tensor.
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
        if len(tensors) == 2 or not bool(flat.any()):
            result = sum(stacked[i] * w[i] for i in range(len(tensors)))
            return result + base if base is not None else result
        raise ComputeError("Multi-SLERP: the weighted mean of the inputs' directions is zero (antipodal inputs with "
                           "balancing weights)", where=name, fix="change the weights")
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
                      normalize_weights=bool(task.params["normalize_weights"]), eps=float(task.params["eps"]),
                      name=task.name)


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

    Norms in float32 (float64 for float64 inputs), everything else in the inputs' dtype, as mergekit does. Units
    ``u_i = x_i/|x_i|`` of the inputs with ``|x_i| > tol`` (weights renormalized over them); start at the
    normalized weighted mean (the first unit when that mean is below ``tol``); iterate
    ``v = sum a_i theta_i/sin(theta_i) (u_i - cos(theta_i) m)`` (terms with ``theta_i < tol`` skipped),
    ``m <- cos|v| m + sin|v| v/|v|``, renormalized, until ``|v| < tol`` or ``max_iter``. Result
    ``(sum_i a_i |x_i|) m`` with the original weights; zeros when no input has a norm above ``tol``.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = tensors[0].dtype
    norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(norm_dtype)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    units = [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for weight, unit in zip(weights, units):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, units):
            cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - cos * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(dtype)
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
