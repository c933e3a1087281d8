"""Element-wise combinations: linear (weighted average), passthrough (copy, optionally scaled), NearSwap."""

from __future__ import annotations

import torch

from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope


def linear(tensors: list[torch.Tensor], weights: list[float], *, normalize: bool = True) -> torch.Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``: accumulated one fused multiply-add per input
    into float32 (float64 for float64 inputs: the executor hands this method such inputs), as mergekit does.
    Weights that sum to 0 give non-finite values, which the caller reports."""
    coefficients = torch.tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)
    result = tensors[0] * coefficients[0]
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(coefficients.sum())
    return result


def linear_merge(task: MergeTask) -> torch.Tensor:
    return linear(task.inputs, [float(p["weight"]) for p in task.model_params],
                  normalize=bool(task.params["normalize"]))


LINEAR = MergeMethod(
    name="linear",
    function=linear_merge,
    parameters=(
        ParameterSpec("weight", float, Scope.INPUT, help="weight of this model"),
        ParameterSpec("normalize", bool, Scope.SHARED, True, help="divide by the sum of the weights"),
    ),
    elementwise=True, internal_float32=True,
    description="weighted average of the models",
    reference="https://arxiv.org/abs/2203.05482",
)


def passthrough_merge(task: MergeTask) -> torch.Tensor:
    """The single input, times ``scale`` when one is given."""
    scale = task.model_params[0].get("scale")
    tensor = task.inputs[0]
    return tensor.clone() if scale is None else tensor * scale


PASSTHROUGH = MergeMethod(
    name="passthrough",
    function=passthrough_merge,
    parameters=(ParameterSpec("scale", float, Scope.INPUT, None, help="optional factor applied to the tensor",
                                          optional=True),),
    max_inputs=1, elementwise=True,
    description="copy tensors from one model per slice (layer stacking, 'frankenmerges')",
)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Take the other model's value where it is close to the base's:
    ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)``, ``result = w * other + (1 - w) * base`` (in the inputs'
    dtype)."""
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def nearswap_merge(task: MergeTask) -> torch.Tensor:
    (other, _), = task.non_base()
    return nearswap(task.base, other, float(task.params["t"]))


NEARSWAP = MergeMethod(
    name="nearswap",
    function=nearswap_merge,
    parameters=(ParameterSpec("t", float, Scope.SHARED, help="similarity threshold"),),
    base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2, elementwise=True,
    description="swap in the other model's values where they are within t of the base",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
