"""The parameters a recipe gives that its merge method never reads (mergekit drops them silently; mtool warns,
or refuses them with ``--strict``): names the method does not have, whole-tensor parameters under one model, and
per-model parameters given to the base model of a method that does not weight the base."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mtool.merger.diagnostics import Diagnostics
from mtool.merger.methods.base import BasePolicy, MergeMethod, Scope
from mtool.merger.recipe import ModelReference, Recipe, resembling

Block = tuple[str, "dict[str, Any] | None", "ModelReference | None", "ModelReference | None"]


def _blocks(recipe: Recipe) -> Iterator[Block]:
    """``(where, parameters, model or None for a shared block, the base model there)`` of every block."""
    yield "parameters", recipe.parameters, None, recipe.base_model
    for module_name, models, slices in recipe.input_groups():
        prefix = f"modules.{module_name}." if module_name else ""
        if module_name:
            yield f"{prefix}parameters", recipe.modules[module_name].parameters, None, recipe.base_model
        for i, entry in enumerate(models or []):
            yield f"{prefix}models[{i}].parameters", entry.parameters, entry.model, recipe.base_model
        for i, output_slice in enumerate(slices or []):
            base = output_slice.base_model or recipe.base_model
            yield f"{prefix}slices[{i}].parameters", output_slice.parameters, None, base
            for j, source in enumerate(output_slice.sources):
                yield f"{prefix}slices[{i}].sources[{j}].parameters", source.parameters, source.model, base


def check_parameter_blocks(recipe: Recipe, method: MergeMethod, diagnostics: Diagnostics) -> None:
    """Report every parameter the method will not read (see the module docstring)."""
    known = {p.name: p for p in method.parameters}
    uses_base = method.base is not BasePolicy.IGNORED
    for where, block, model, base in _blocks(recipe):
        for name in block or {}:
            spec = known.get(name)
            located = recipe.where(f"{where}.{name}")
            if spec is None:
                names = ", ".join(sorted(known)) or "none"
                close = resembling(name, known)
                diagnostics.ignored(f"merge method {method.name!r} has no parameter {name!r}; mergekit ignores it",
                                    where=located, fix=f"did you mean `{close}`?" if close
                                    else f"its parameters are: {names}")
            elif model is not None and spec.scope is Scope.SHARED:
                diagnostics.ignored(f"merge method {method.name!r} reads {name!r} once per tensor, from the slice, "
                                    "module or global parameters; mergekit ignores it in a model's parameters",
                                    where=located, fix=f"move {name!r} to the recipe's `parameters:`")
            elif model is not None and uses_base and model == base and spec.scope is Scope.NON_BASE:
                diagnostics.ignored(f"merge method {method.name!r} does not use {name!r} for the base model; "
                                    "mergekit ignores it", where=located)
