"""A search space: which parameters of a recipe a search may set, and to what.

A space file lists dimensions; each names a merge parameter (``weight``, ``density``, ``t``, ``lambda``...),
whose it is (``model``: a model of the recipe's ``models:``, by its reference as written or its index; none for
the recipe's global ``parameters:``) and its values:

- ``range: [low, high]`` (optionally ``log: true`` or ``step: q``): a number in the range;
- ``choices: [...]``: one of the values (numbers, booleans, strings);
- ``gradient: k`` with a range: a list of k numbers, each in the range (mergekit's gradients over the layers);
- ``filters: [{filter: self_attn, range: ...}, {range: ...}]``: a per-filter setting (mergekit's
  ``[{filter, value}]``), each entry with values of its own (no ``filter``: every other tensor).

Every other part of the recipe stays as written. Each dimension has a label (the parameter, after the model's
folder name for a per-model one; ``[i]`` for a gradient's i-th value, ``@filter`` for a filter's), which names it
in the trials and the card.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtool.errors import ConfigError
from mtool.merger.recipe import ModelReference, Recipe

GUIDE = "see docs/eval.md (search spaces) for the keys of a space file"
Choice = bool | int | float | str | None


class _ValueFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    range: tuple[float, float] | None = None
    choices: list[Choice] | None = Field(default=None, min_length=1)
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    gradient: int | None = Field(default=None, ge=2)


VALUE_KEYS = tuple(_ValueFields.model_fields)
SIGNIFICANT_DIGITS = 4  # of a searched number in the recipe it makes


class Values(_ValueFields):
    """What one value may be: a number in ``range`` (log-scaled, or on a ``step`` grid), one of ``choices``, or
    a ``gradient`` of that many numbers in ``range``."""

    @model_validator(mode="after")
    def _one_kind(self) -> "Values":
        if (self.range is None) == (self.choices is None):
            raise ValueError("give either range: [low, high] or choices: [...]")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(self.range)}")
        if self.choices is not None and (self.log or self.step or self.gradient):
            raise ValueError("log, step and gradient go with a range, not with choices")
        if self.log and (self.step or self.range[0] <= 0):
            raise ValueError("log needs a range above 0 and no step")
        return self

    def suggest(self, trial: Any, label: str) -> Any:
        """The value an Optuna trial chooses (a list for a gradient)."""
        if self.choices is not None:
            return trial.suggest_categorical(label, self.choices)
        low, high = self.range
        if self.gradient:
            return [self._readable(trial.suggest_float(f"{label}[{index}]", low, high, log=self.log, step=self.step))
                    for index in range(self.gradient)]
        return self._readable(trial.suggest_float(label, low, high, log=self.log, step=self.step))

    def _readable(self, value: float) -> float:
        """``value`` to :data:`SIGNIFICANT_DIGITS` significant digits (within the range): the merged recipe, and
        the card that shows it, carry numbers a person can read and type again. A ``step`` grid is kept as is."""
        if self.step is not None:
            return value
        low, high = self.range
        return min(high, max(low, float(f"{value:.{SIGNIFICANT_DIGITS}g}")))


class FilterValues(Values):
    filter: str | None = None  # a substring of the tensor names it applies to; none: every other tensor


class Dimension(_ValueFields):
    """One parameter of the recipe and its values: inline, or per filter."""

    name: str = Field(min_length=1)
    model: str | int | None = None
    filters: list[FilterValues] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _values_once(self) -> "Dimension":
        inline = {key: getattr(self, key) for key in VALUE_KEYS if key in self.model_fields_set}
        if self.filters is not None and inline:
            raise ValueError(f"give the values per filter, not also inline ({', '.join(inline)})")
        if self.filters is None:
            Values(**inline)  # the same checks as a filter's values
        return self

    def values(self) -> Values:
        return Values(**{key: getattr(self, key) for key in VALUE_KEYS})


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parameters: list[Dimension] = Field(min_length=1)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=True)


def _fitted(values: Values, label: str, value: Any) -> dict[str, Any] | None:
    """``{label: value}`` (a gradient: one label per value) when ``value`` is one the space can give, else None."""
    if values.choices is not None:
        return {label: value} if value in values.choices else None
    numbers = value if isinstance(value, list) else [value]
    if not all(isinstance(number, (int, float)) and not isinstance(number, bool) for number in numbers):
        return None
    low, high = values.range
    if len(numbers) != (values.gradient or 1) or not all(low <= number <= high for number in numbers):
        return None
    if values.step and any(abs((number - low) / values.step - round((number - low) / values.step)) > 1e-9
                           for number in numbers):
        return None
    if values.gradient:
        return {f"{label}[{index}]": float(number) for index, number in enumerate(numbers)}
    return {label: float(numbers[0])}


def load_space(path: str | Path) -> SearchSpace:
    from mtool.yamlfiles import load_yaml_model

    return load_yaml_model(path, SearchSpace, what="search space", guide=GUIDE)


class BoundSpace:
    """A space tied to a recipe: each dimension's place in the recipe and its label, checked once."""

    def __init__(self, space: SearchSpace, recipe: Recipe) -> None:
        self.space = space
        self.recipe = recipe
        self.targets = [self._target(dimension, index) for index, dimension in enumerate(space.parameters)]
        for index, (dimension, target) in enumerate(zip(space.parameters, self.targets)):
            self._check_read(dimension, target, index)
        places = [(target, dimension.name) for target, dimension in zip(self.targets, space.parameters)]
        repeated = {place for place in places if places.count(place) > 1}
        if repeated:
            raise ConfigError(f"the space sets the parameter {sorted(repeated)[0][1]!r} of the same model twice",
                              where="parameters", fix=GUIDE)
        self.labels = [self._label(dimension, target) for dimension, target in zip(space.parameters, self.targets)]

    def _target(self, dimension: Dimension, index: int) -> int | None:
        """The index in ``models:`` of the dimension's model (None: the global parameters)."""
        if dimension.model is None:
            return None
        where = f"parameters[{index}].model"
        models = self.recipe.models or []
        if not models:
            raise ConfigError("a per-model dimension needs a recipe with `models:` (for `slices:` recipes, search "
                              "the global parameters)", where=where)
        if isinstance(dimension.model, int):
            if not 0 <= dimension.model < len(models):
                raise ConfigError(f"the recipe lists {len(models)} models; there is no model {dimension.model}",
                                  where=where)
            return dimension.model
        wanted = ModelReference.parse(dimension.model)
        for position, entry in enumerate(models):
            if entry.model == wanted or Path(entry.model.model).resolve() == Path(wanted.model).resolve():
                return position
        listed = ", ".join(str(entry.model) for entry in models)
        raise ConfigError(f"the recipe lists no model {dimension.model!r} (it lists {listed})", where=where)

    def _check_read(self, dimension: Dimension, target: int | None, index: int) -> None:
        """A searched parameter must change the merge: one the method has, where the method reads it (a recipe
        may carry parameters mergekit ignores, with a warning; a search over one would only waste trials)."""
        from mtool.merger.methods import get_method
        from mtool.merger.methods.base import Scope

        method = get_method(self.recipe.merge_method)
        spec = method.parameter(dimension.name)
        if spec is None:
            names = ", ".join(sorted(p.name for p in method.parameters)) or "none"
            raise ConfigError(f"merge method {method.name!r} has no parameter {dimension.name!r}",
                              where=f"parameters[{index}].name", fix=f"its parameters are: {names}")
        if target is not None and spec.scope is Scope.SHARED:
            raise ConfigError(f"merge method {method.name!r} reads {dimension.name!r} once per tensor, not per model",
                              where=f"parameters[{index}].model", fix="drop `model:` to search it for every tensor")
        for values in dimension.filters or [dimension.values()]:
            for value in list(values.range or ()) + [v for v in values.choices or () if not isinstance(v, bool)]:
                allowed = spec.outside_range(value)
                if allowed is not None:  # a recipe may say so (with a warning); a search should not try it
                    raise ConfigError(f"the space gives {dimension.name!r} the value {value:g}, outside {allowed} "
                                      "where it means something", where=f"parameters[{index}]",
                                      fix=f"keep {dimension.name!r} within {allowed}")

    def _label(self, dimension: Dimension, target: int | None) -> str:
        if target is None:
            return dimension.name
        models = self.recipe.models or []
        names = [Path(entry.model.model).name for entry in models]
        owner = names[target] if names.count(names[target]) == 1 else f"models[{target}]"
        return f"{owner}.{dimension.name}"

    def describe(self) -> list[str]:
        """Each dimension in words: ``lambda: a gradient of 2 values in [0.5, 2]``."""
        def values(entry: Values) -> str:
            if entry.choices is not None:
                return "one of " + ", ".join(map(str, entry.choices))
            low, high = entry.range
            scale = " (log scale)" if entry.log else f" (step {entry.step:g})" if entry.step else ""
            where = f"in [{low:g}, {high:g}]{scale}"
            return f"a gradient of {entry.gradient} values {where}" if entry.gradient else where

        lines = []
        for dimension, label in zip(self.space.parameters, self.labels):
            if dimension.filters is None:
                lines.append(f"{label}: {values(dimension.values())}")
            else:
                lines.append(f"{label}: " + "; ".join(f"{entry.filter or 'other tensors'} {values(entry)}"
                                                       for entry in dimension.filters))
        return lines

    def suggest(self, trial: Any) -> list[Any]:
        """Each dimension's value for an Optuna trial, in order."""
        values = []
        for dimension, label in zip(self.space.parameters, self.labels):
            if dimension.filters is None:
                values.append(dimension.values().suggest(trial, label))
                continue
            entries = []
            for entry in dimension.filters:
                value = entry.suggest(trial, f"{label}@{entry.filter or '*'}")
                entries.append({"filter": entry.filter, "value": value} if entry.filter else {"value": value})
            values.append(entries)
        return values

    def written_params(self) -> dict[str, Any] | None:
        """The values the recipe has as written (a model's own, else the global one, else the method's default),
        labelled as a trial's; None when one of them is missing or lies outside the space."""
        from mtool.merger.methods import get_method

        defaults = {spec.name: spec.default for spec in get_method(self.recipe.merge_method).parameters
                    if not spec.required}
        data = self.recipe.canonical()
        params: dict[str, Any] = {}
        for dimension, target, label in zip(self.space.parameters, self.targets, self.labels):
            blocks = [data.get("parameters") or {}]
            if target is not None:
                blocks.insert(0, data["models"][target].get("parameters") or {})
            value = next((block[dimension.name] for block in blocks if dimension.name in block),
                         defaults.get(dimension.name))
            found = self._written(dimension, label, value)
            if found is None:
                return None
            params.update(found)
        return params

    @staticmethod
    def _written(dimension: Dimension, label: str, value: Any) -> dict[str, Any] | None:
        if dimension.filters is None:
            return _fitted(dimension.values(), label, value)
        if not isinstance(value, list) or len(value) != len(dimension.filters):
            return None
        params: dict[str, Any] = {}
        for entry, item in zip(dimension.filters, value):
            if not isinstance(item, dict) or item.get("filter") != entry.filter:
                return None
            found = _fitted(entry, f"{label}@{entry.filter or '*'}", item.get("value"))
            if found is None:
                return None
            params.update(found)
        return params

    def apply(self, values: list[Any]) -> Recipe:
        """The recipe with each dimension's parameter set to its value."""
        data = copy.deepcopy(self.recipe.canonical())
        for dimension, target, value in zip(self.space.parameters, self.targets, values):
            block = data if target is None else data["models"][target]
            block.setdefault("parameters", {})[dimension.name] = value
        try:
            return Recipe.model_validate(data)
        except ValueError as error:  # pydantic's ValidationError
            raise ConfigError(f"the space's values make an invalid recipe: {error}", fix=GUIDE) from None
