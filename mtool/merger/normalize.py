"""A recipe's inputs as mergekit plans them: for every module of the model, a list of output slices.

* ``models:`` gives each module one slice spanning all its layers in every model, the models' own parameters
  on their sources, and the base appended as a last source (without parameters) when it is not listed;
* ``slices:`` applies to the model's one module. On a model with several modules (a vision-language model)
  mergekit refuses them; mtool applies them to the language tower and merges the other modules as ``models:``
  would, from the first slice's sources;
* ``modules:`` names each module (see :mod:`mtool.merger.layout` for the names) with its own ``models`` or
  ``slices`` and ``parameters``. A module the recipe does not name is left out of the output, as in mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtool.errors import ConfigError
from mtool.merger import layout
from mtool.merger.recipe import InputSlice, ModelEntry, ModelReference, OutputSlice, Recipe

if TYPE_CHECKING:
    from mtool.merger.diagnostics import Diagnostics


@dataclass(frozen=True)
class ModelShape:
    """The modules of the output model: layer prefixes in order, the language tower's, recipe names."""

    prefixes: list[str]
    language: str
    names: dict[str, str]  # recipe name -> prefix

    @classmethod
    def of(cls, tensor_names: list[str]) -> "ModelShape":
        counts = layout.layer_counts(tensor_names)
        prefixes = list(counts)
        if not prefixes:
            raise ConfigError("the model has no numbered layers (no tensors named like model.layers.0.*)",
                              fix="mtool merges transformer checkpoints with numbered layers")
        language = layout.language_module(prefixes, counts)
        return cls(prefixes, language, layout.module_names(prefixes, language))


@dataclass(frozen=True)
class ModuleSlices:
    """One module's output slices and its ``parameters`` (``modules:`` recipes only)."""

    prefix: str
    slices: list[OutputSlice]
    parameters: dict[str, Any] | None = None
    label: str = "slices"  # where the slices come from in the recipe, for messages


def _whole_models(entries: list[ModelEntry], base: ModelReference | None, prefix: str,
                  layer_count) -> OutputSlice:
    sources = [InputSlice(model=e.model, layer_range=(0, layer_count(e.model, prefix)), parameters=e.parameters)
               for e in entries]
    if base is not None and all(s.model != base for s in sources):
        sources.append(InputSlice(model=base, layer_range=(0, layer_count(base, prefix))))
    return OutputSlice(sources=sources)


def normalize(recipe: Recipe, shape: ModelShape, layer_count, diagnostics: "Diagnostics") -> list[ModuleSlices]:
    """The recipe's modules and their slices; ``layer_count(model reference, prefix)`` counts a model's layers."""
    base = recipe.base_model
    if recipe.models:
        return [ModuleSlices(p, [_whole_models(recipe.models, base, p, layer_count)], label="models")
                for p in shape.prefixes]
    if recipe.slices:
        modules = [ModuleSlices(shape.language, list(recipe.slices))]
        others = [p for p in shape.prefixes if p != shape.language]
        if others:
            diagnostics.note(f"`slices:` apply to the language tower ({shape.language}); the other modules "
                             f"({', '.join(others)}) are merged whole from the first slice's models (mergekit "
                             "refuses `slices:` for a model with several modules)")
            entries = [ModelEntry(model=s.model, parameters=s.parameters) for s in recipe.slices[0].sources]
            modules += [ModuleSlices(p, [_whole_models(entries, base, p, layer_count)], label="slices[0]")
                        for p in others]
        return modules
    modules = []
    for name, definition in (recipe.modules or {}).items():
        prefix = shape.names.get(name)
        if prefix is None:
            raise ConfigError(f"the model has no module {name!r}", where=f"modules.{name}",
                              fix=f"its modules are: {', '.join(sorted(shape.names))}")
        slices = list(definition.slices) if definition.slices else \
            [_whole_models(definition.models or [], base, prefix, layer_count)]
        label = f"modules.{name}." + ("slices" if definition.slices else "models")
        modules.append(ModuleSlices(prefix, slices, definition.parameters, label=label))
    missing = [p for p in shape.prefixes if p not in {m.prefix for m in modules}]
    if missing:
        diagnostics.note(f"the recipe's `modules:` leave out {', '.join(missing)}: their tensors are not merged "
                         "and the output lacks them, as in mergekit")
    return modules
