"""Parameter values as recipes write them: scalars, gradients and filtered lists, resolved per tensor.

* a scalar applies everywhere: ``weight: 0.5``;
* a gradient is a list of numbers interpolated over the layers of a slice: with ``t`` the layer's relative
  position (``i / (n - 1)`` for layer ``i`` of ``n``), ``x = t * (len - 1)``, the value is
  ``(1 - frac(x)) * v[floor(x)] + frac(x) * v[floor(x) + 1]``; a list of booleans picks ``v[floor(x)]``;
* a filtered list ``[{filter: self_attn, value: 0.3}, {value: 0.7}]`` takes the first entry whose ``filter``
  is a substring of the tensor's name (no filter, or ``*``, matches everything); its value may be a gradient.

Precedence, highest first: the source's (model's) own ``parameters``, the slice's, the recipe's global ones,
then the method's default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mtool.errors import ConfigError
from mtool.merger.methods.base import ParameterSpec, ParameterValue

Settings = Mapping[str, Any] | None
_UNSET = object()


def evaluate_setting(setting: Any, *, tensor_name: str, t: float, spec: ParameterSpec, where: str) -> Any:
    """The value of one parameter setting for one tensor at relative depth ``t`` (``_UNSET`` if no filter
    matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(entry, dict) for entry in setting):
        for entry in setting:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ConfigError(f"parameter {spec.name!r}: a filtered entry needs `value` (and optionally "
                                  f"`filter`), got keys {sorted(entry)}", where=where)
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or str(pattern) in tensor_name:
                return evaluate_setting(entry["value"], tensor_name=tensor_name, t=t, spec=spec, where=where)
        return _UNSET
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"parameter {spec.name!r} is an empty list", where=where)
        if any(isinstance(v, (list, dict)) for v in setting):
            raise ConfigError(f"parameter {spec.name!r}: a gradient must be a list of numbers", where=where)
        values = [spec.validate(v, where=where) for v in setting]
        position = t * (len(values) - 1)
        low = int(position)
        if spec.kind is bool or any(v is None for v in values):
            return values[low]
        high = min(len(values) - 1, low + 1)
        fraction = position - low
        return spec.validate((1 - fraction) * values[low] + fraction * values[high], where=where)
    return spec.validate(setting, where=where)


def resolve_parameter(spec: ParameterSpec, sources: Iterable[Settings], *, tensor_name: str, t: float,
                      where: str) -> ParameterValue:
    """The first value any source gives for ``spec`` (see the module docstring), else its default."""
    for settings in sources:
        if settings and spec.name in settings:
            value = evaluate_setting(settings[spec.name], tensor_name=tensor_name, t=t, spec=spec, where=where)
            if value is not _UNSET:
                return value
    if spec.required:
        raise ConfigError(f"parameter {spec.name!r} is required and has no value for tensor {tensor_name!r}",
                          where=where, fix=f"give `{spec.name}` in the model's or the recipe's parameters")
    return spec.default  # type: ignore[return-value]
