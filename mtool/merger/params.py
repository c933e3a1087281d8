"""Parameter values as recipes write them: scalars, gradients and filtered lists, resolved per tensor as
mergekit 0.1.5 resolves them.

* a scalar applies everywhere: ``weight: 0.5``; strings are read as the parameter's type (``"1e-3"``);
* a gradient is a list of numbers interpolated over the layers of a slice: with ``t`` the layer's relative
  position (``i / (n - 1)`` for layer ``i`` of ``n``, 1 for a one-layer slice), ``x = t * (len - 1)``, the value
  is ``(1 - frac(x)) * v[floor(x)] + frac(x) * v[floor(x) + 1]``; a list of booleans (or other non-numbers)
  picks ``v[floor(x)]``; an empty list gives no value;
* a filtered list ``[{filter: self_attn, value: 0.3}, {value: 0.7}]`` takes the first entry whose ``filter`` is a
  substring of the tensor's name (no filter, or ``*``, matches everything); its value may be a gradient. When no
  entry matches, the list gives no value.

Precedence, highest first: the source's (model's) own ``parameters``, the slice's, the module's, the recipe's
global ones, then the method's default; a scope whose setting gives no value falls through to the next.
Whole-tensor parameters (``t``, ``lambda``, ``normalize``...) are read from the slice, module and global scopes
only, and their filters see the output tensor's name; per-model parameters (``weight``, ``density``...) are read
from all four, and their filters see that model's own tensor name (its layer numbering).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mtool.errors import ConfigError
from mtool.merger.methods.base import ParameterSpec, ParameterValue

Settings = Mapping[str, Any] | None
_SCALARS = (bool, int, float, str)


def evaluate_setting(setting: Any, *, tensor_name: str, t: float, spec: ParameterSpec, where: str) -> Any:
    """The value of one parameter setting for one tensor at relative depth ``t``; None when the setting gives no
    value (no filter matched, or an empty list)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return spec.validate(setting, where=where)
    if not isinstance(setting, list):
        raise ConfigError(f"parameter {spec.name!r}: unexpected value {setting!r}", where=where,
                          fix="write a scalar, a list of numbers or a list of {filter, value} entries")
    if not setting:
        return None
    if all(isinstance(entry, _SCALARS) for entry in setting):
        values = [spec.validate(entry, where=where) for entry in setting]
        position = t * (len(values) - 1)
        low = int(position)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[low]
        high = min(len(values) - 1, low + 1)
        fraction = position - low
        return spec.validate((1 - fraction) * values[low] + fraction * values[high], where=where)
    if not all(isinstance(entry, dict) for entry in setting):
        raise ConfigError(f"parameter {spec.name!r}: a list mixes numbers and {{filter, value}} entries",
                          where=where)
    for entry in setting:
        unknown = set(entry) - {"filter", "value"}
        if unknown or "value" not in entry:
            raise ConfigError(f"parameter {spec.name!r}: a filtered entry needs `value` (and optionally `filter`), "
                              f"got keys {sorted(entry)}", where=where)
        value, pattern = entry["value"], entry.get("filter")
        if isinstance(value, dict) or (isinstance(value, list) and not all(isinstance(v, _SCALARS) for v in value)):
            raise ConfigError(f"parameter {spec.name!r}: a filtered value must be a scalar or a list of numbers",
                              where=where)
        if pattern is not None and not isinstance(pattern, str):
            raise ConfigError(f"parameter {spec.name!r}: a filter must be a string, got {pattern!r}", where=where)
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(value, tensor_name=tensor_name, t=t, spec=spec, where=where)
    return None


def resolve_parameter(spec: ParameterSpec, sources: Iterable[Settings], *, tensor_name: str, t: float,
                      where: str) -> ParameterValue:
    """The first value any source gives for ``spec`` (see the module docstring), else its default."""
    for settings in sources:
        if settings and spec.name in settings:
            value = evaluate_setting(settings[spec.name], tensor_name=tensor_name, t=t, spec=spec, where=where)
            if value is not None:
                return value
    if spec.required:
        raise ConfigError(f"parameter {spec.name!r} is required and has no value for tensor {tensor_name!r}",
                          where=where, fix=f"give `{spec.name}` in the model's or the recipe's parameters")
    return spec.default  # type: ignore[return-value]
