"""Combining adapters in weight space with any ``mtool merge`` method, then factoring the result back.

For a module with base weight ``W`` (zero when no base is given) and adapter updates ``dW_i`` (the whole
effect of adapter i on the weight, DoRA included when the base is known), the method merges the models
``W + dW_i`` as ``mtool merge`` would (``W`` is the base model of base-using methods; two-model methods that
require a base, such as SLERP and NearSwap, interpolate from the first adapter's model to the second), and the
merged update ``M - W`` is factored by truncated SVD at the chosen rank.

Without a base, the merge runs on the updates alone (``W = 0``). That is exact for the methods that act on
differences from the base (task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE, Model Stock) and for a
normalized linear average; the spherical methods (SLERP, NuSLERP, Multi-SLERP, Karcher, NearSwap) and an
unnormalized linear sum depend on ``W`` and need the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mtool.errors import InputError

if TYPE_CHECKING:
    import torch

    from mtool.merger.methods.base import MergeMethod

BASE_FREE = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
             "della_linear", "sce", "model_stock", "linear")
PREFIX = "merge:"


@dataclass(frozen=True)
class WeightSpaceMerge:
    """A ``merge:<method>`` combination: the method, per-adapter weights, and its other parameters."""

    method_name: str
    weights: tuple[float, ...]
    density: float | None = None
    params: dict[str, float | bool] = field(default_factory=dict)
    has_base: bool = False

    def method(self) -> "MergeMethod":
        from mtool.merger.methods import get_method

        try:
            return get_method(self.method_name)
        except InputError as error:
            raise InputError(f"unknown merge method {self.method_name!r} in --method {PREFIX}{self.method_name}",
                             fix=error.fix) from None

    def check(self, count: int) -> None:
        from mtool.merger.methods.base import BasePolicy

        method = self.method()
        if method.name == "passthrough":
            raise InputError("passthrough copies one model; it does not combine adapters", where="--method")
        if not self.has_base and (method.name not in BASE_FREE or
                                  (method.name == "linear" and self.params.get("normalize") is False)):
            raise InputError(f"merge method {method.name} works on whole weights, not on updates alone",
                             fix="give the base model with --base")
        base_is_input = method.base is not BasePolicy.IGNORED and not self._first_is_base(method)
        method.check_inputs(count + int(base_is_input), base_is_input or self._first_is_base(method),
                            where=f"--method {PREFIX}{method.name}")
        known = {p.name for p in method.parameters}
        for name in self.params:
            if name not in known:
                raise InputError(f"merge method {method.name} has no parameter {name!r}", where="--param",
                                 fix=f"its parameters are: {', '.join(sorted(known)) or 'none'}")
        self._resolve(method, count, base_is_input)

    @staticmethod
    def _first_is_base(method: "MergeMethod") -> bool:
        """SLERP-like methods: a required base among exactly two models is one end of the interpolation."""
        from mtool.merger.methods.base import BasePolicy

        return method.base is BasePolicy.REQUIRED and method.max_inputs == 2

    def _resolve(self, method: "MergeMethod", count: int, base_is_input: bool):
        """``(params, model_params, base_index)`` of the task, validated like a recipe's."""
        from mtool.merger.methods.base import Scope

        where = f"--method {PREFIX}{method.name}"
        given: dict[str, object] = dict(self.params)
        if self.density is not None:
            given.setdefault("density", self.density)

        def value(spec, model_index: int | None):
            if spec.name == "weight" and model_index is not None:
                return spec.validate(self.weights[model_index], where=where)
            if spec.name in given:
                return spec.validate(given[spec.name], where=where)
            if spec.required:
                raise InputError(f"merge method {method.name} needs parameter {spec.name!r}", where=where,
                                 fix=f"give --param {spec.name}=VALUE")
            return spec.default

        params = {spec.name: value(spec, None) for spec in method.parameters if spec.scope is Scope.SHARED}
        model_params = []
        base_index = 0 if base_is_input or self._first_is_base(method) else None
        for position in range(count + int(base_is_input)):
            adapter_index = position - int(base_is_input)
            is_base = base_is_input and position == 0
            model_params.append({
                spec.name: (spec.default if is_base and spec.name == "weight" and not spec.required
                            else value(spec, None if is_base else adapter_index))
                for spec in method.parameters
                if spec.scope is Scope.INPUT or (spec.scope is Scope.NON_BASE and position != base_index)
            })
        for check in method.extra_checks:
            check(params, model_params, where)
        return params, model_params, base_index

    def merged_delta(self, name: str, base: "torch.Tensor", deltas: list["torch.Tensor"],
                     seed: int) -> "torch.Tensor":
        """``M - W`` for one module, in float32 (``base`` is ``W``, zeros when no base was given)."""
        import torch

        from mtool.merger.methods.base import BasePolicy, MergeTask
        from mtool.seeding import tensor_seed

        method = self.method()
        base_is_input = method.base is not BasePolicy.IGNORED and not self._first_is_base(method)
        params, model_params, base_index = self._resolve(method, len(deltas), base_is_input)
        models = [base + delta for delta in deltas]
        inputs = ([base] if base_is_input else []) + models
        generator = torch.Generator().manual_seed(tensor_seed(seed, name)) if method.random else None
        merged = method.merge(MergeTask(name=name, inputs=inputs, model_params=model_params, params=params,
                                        base_index=base_index, generator=generator))
        return merged.float() - base
