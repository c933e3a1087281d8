"""Merge recipes: mergekit's YAML, validated into typed objects, with errors that name the line.

A recipe names a ``merge_method`` and its inputs as ``models`` (whole models), ``slices`` (each a list of
``sources`` with a ``layer_range [start, end)``) or ``modules`` (per module of a multi-module model such as a
vision-language model: ``models`` or ``slices`` and ``parameters``), plus an optional ``base_model``,
``parameters`` (global; also per model / per source / per slice / per module), ``dtype`` (the precision inputs
are read at), ``out_dtype``, ``tokenizer_source`` / ``tokenizer``, and ``chat_template``.

Model references are strings ``path_or_hub_id[@revision][+adapter_path_or_hub_id]``
(:mod:`mtool.merger.references`): ``+`` applies a LoRA adapter to the model on the fly.

mergekit reads recipes leniently: keys it does not know are ignored. So does mtool, with a warning naming each
one (an error with ``--strict``): :func:`parse_recipe` records them in :attr:`Recipe.ignored_keys`. The one
block mergekit does not know and mtool reads is ``mtool:`` (:class:`MtoolSettings`): the settings where mtool
computes differently from mergekit, each off by default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mtool.errors import ConfigError, printable, shown
from mtool.merger.references import ModelReference, as_reference, reference_text
from mtool.safe_yaml import line_of, load_yaml, read_text

ParameterSetting = Any  # scalar | gradient list | [{filter, value}] (validated in params.py)
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One entry of a recipe's ``models:`` list."""

    model: ModelReference
    parameters: dict[str, ParameterSetting] | None = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: as_reference(v))


class InputSlice(_Strict):
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: as_reference(v))

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelReference | None = None
    parameters: dict[str, ParameterSetting] | None = None
    residual_weight: float | None = None

    _parse_base = field_validator("base_model", mode="before")(lambda cls, v: None if v is None else as_reference(v))

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers, got "
                             f"{shown(sorted(lengths))}")
        return self


class ZeroToken(_Strict):
    """A token row of zeros: ``{kind: zero}``."""

    kind: Literal["zero"]


class ModelToken(_Strict):
    """Another token's row in one model: ``{kind: model_token, model: M, token_id: 3}`` (or ``token: "<s>"``)."""

    kind: Literal["model_token"]
    model: ModelReference
    token_id: int | None = None
    token: str | None = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: as_reference(v))

    @model_validator(mode="after")
    def _one_of(self) -> "ModelToken":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source needs exactly one of `token_id` and `token`")
        return self


class TokenSource(_Strict):
    """Where one output token's embedding row comes from (``tokenizer.tokens``): a model's row for the same
    token, zeros, or another token's row; ``force`` replaces the row in every model, not only where missing."""

    source: Union[ZeroToken, ModelToken, ModelReference, None] = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _parse_source(cls, value: Any) -> Any:
        if isinstance(value, dict) and "kind" in value:
            return value
        return None if value is None else as_reference(value)


class TokenizerSettings(_Strict):
    source: str = "union"  # "base", "union" or a model reference (mergekit's default is the union)
    tokens: dict[str, TokenSource] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)

    _check_source = field_validator("source")(lambda cls, v: reference_text(v, ("base", "union")))


class ModuleDefinition(_Strict):
    """One module of a ``modules:`` recipe: its ``models`` or ``slices``, and its ``parameters``."""

    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, ParameterSetting] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "ModuleDefinition":
        if bool(self.models) == bool(self.slices):
            raise ValueError("a module needs either `models:` or `slices:` (exactly one of them)")
        return self


class MtoolSettings(_Strict):
    """``mtool:``: where mtool computes differently from mergekit 0.1.5, each off by default (so a recipe
    without the block gives mergekit's tensors). mergekit ignores the block."""

    math: Literal["mergekit", "float32"] = Field(
        "mergekit", description="mergekit: each method computes in the dtype mergekit uses (bfloat16 task "
        "vectors for bfloat16 models, rounded weights included); float32: every method in float32 (float64 for "
        "float64 inputs), rounded once to the output dtype")
    post_layer_t: Literal[0, 1] = Field(
        0, description="where gradients are evaluated for the tensors after the layers (final norm, lm_head): "
        "0 (mergekit: the start of the gradient, with the last slice's settings) or 1 (the top of the stack)")
    vocabulary_fill: Literal["mergekit", "base"] = Field(
        "mergekit", description="with tokenizer_source: how a model's row for a token it lacks is filled. "
        "mergekit: the only model that has the token, else the base's row, else the mean over the models that "
        "have it; base: the base's row for the token, else that model's mean row")

    def differences(self) -> dict[str, Any]:
        """The settings that differ from mergekit's behaviour (for the lineage record and --dry-run)."""
        return self.model_dump(exclude_defaults=True)


class Recipe(_Strict):
    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, ModuleDefinition] | None = None
    base_model: ModelReference | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None  # a stage's name in a multi-stage recipe; mergekit ignores it elsewhere
    mtool: MtoolSettings = Field(default_factory=MtoolSettings)

    _ignored: dict[str, str | None] = PrivateAttr(default_factory=dict)  # key path -> the known key it resembles
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)  # key path -> its line in the file
    _source: str = PrivateAttr(default="recipe")

    _parse_base = field_validator("base_model", mode="before")(lambda cls, v: None if v is None else as_reference(v))
    _check_tokenizer_source = field_validator("tokenizer_source")(
        lambda cls, v: reference_text(v, ("base", "union")))

    @model_validator(mode="after")
    def _one_input_form(self) -> "Recipe":
        if sum(bool(form) for form in (self.models, self.slices, self.modules)) != 1:
            raise ValueError("give exactly one of `models:`, `slices:` and `modules:`")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either `tokenizer_source:` or a `tokenizer:` block, not both")
        return self

    @property
    def ignored_keys(self) -> list[str]:
        """Keys of the recipe file that mergekit and mtool do not read (``slices[0].foo``)."""
        return list(self._ignored)

    def resembled_key(self, path: str) -> str | None:
        """The recipe key an ignored key resembles (``merge_methd`` -> ``merge_method``), if any."""
        return self._ignored.get(path)

    def where(self, path: str) -> str:
        """``file, line N`` of the key at ``path`` (``models[0].parameters.weight``), else just the file."""
        line = self._lines.get(path)
        return f"{self._source}, line {line} ({path})" if line else f"{self._source} ({path})"

    @property
    def tokenizer_choice(self) -> str | None:
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    def input_groups(self) -> list[tuple[str, list[ModelEntry] | None, list[OutputSlice] | None]]:
        """``(module name or "", models, slices)`` of every input form the recipe uses."""
        if self.modules:
            return [(name, module.models, module.slices) for name, module in self.modules.items()]
        return [("", self.models, self.slices)]

    def referenced_models(self) -> list[ModelReference]:
        """Every distinct model the recipe reads, in order of first mention (the base first)."""
        seen: dict[ModelReference, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for _, models, slices in self.input_groups():
            for entry in models or []:
                seen[entry.model] = None
            for output_slice in slices or []:
                if output_slice.base_model:
                    seen[output_slice.base_model] = None
                for source in output_slice.sources:
                    seen[source.model] = None
        return list(seen)

    def canonical(self) -> dict[str, Any]:
        """The recipe as plain data, without unset keys (for the lineage record and the card)."""
        data = self.model_dump(mode="json", exclude_none=True)
        differences = self.mtool.differences()
        if differences:
            data["mtool"] = differences
        else:
            data.pop("mtool", None)
        return data


# The keys each part of a recipe may have, and the parts below it (for finding the keys mergekit ignores).
_CHILDREN: dict[type[BaseModel], dict[str, tuple[str, type[BaseModel]]]] = {
    Recipe: {"models": ("list", ModelEntry), "slices": ("list", OutputSlice), "modules": ("dict", ModuleDefinition),
             "tokenizer": ("one", TokenizerSettings)},
    ModuleDefinition: {"models": ("list", ModelEntry), "slices": ("list", OutputSlice)},
    OutputSlice: {"sources": ("list", InputSlice)},
    TokenizerSettings: {"tokens": ("dict", TokenSource)},
}


def resembling(key: object, known: Iterable[str]) -> str | None:
    """The one of ``known`` that ``key`` is most likely a misspelling of, if any: one with the same letters in
    another order first (``modles`` -> ``models``, not ``modules``), else the closest by difflib's ratio."""
    import difflib

    known = list(known)
    swapped = [name for name in known if sorted(name) == sorted(str(key))]
    if swapped:
        return swapped[0]
    matches = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
    return matches[0] if matches else None


def _drop_ignored_keys(data: Any, model: type[BaseModel], path: str, ignored: dict[str, str | None]) -> Any:
    """``data`` without the keys ``model`` does not have (their paths, with the known key each resembles, put in
    ``ignored``), recursively."""
    if not isinstance(data, dict):
        return data
    known = set(model.model_fields)
    kept = {}
    for key, value in data.items():
        if key not in known:
            ignored[f"{path}{key}" if path else str(key)] = resembling(key, known)
            continue
        child = _CHILDREN.get(model, {}).get(key)
        if child is not None and value is not None:
            form, child_model = child
            if form == "list" and isinstance(value, list):
                value = [_drop_ignored_keys(item, child_model, f"{path}{key}[{i}].", ignored)
                         for i, item in enumerate(value)]
            elif form == "dict" and isinstance(value, dict):
                value = {name: _drop_ignored_keys(item, child_model, f"{path}{key}.{name}.", ignored)
                         for name, item in value.items()}
            elif form == "one":
                value = _drop_ignored_keys(value, child_model, f"{path}{key}.", ignored)
        kept[key] = value
    return kept


def local_weight_files(recipe: Recipe) -> list[Path]:
    """The weight files of the recipe's models that are local folders (for hashing them early). Anything that
    cannot be found or read is skipped here: planning reports it."""
    from mtool.errors import MtoolError
    from mtool.io.reading import weight_files_of_folder

    files: list[Path] = []
    for reference in recipe.referenced_models():
        folder = Path(reference.model).expanduser()
        if folder.is_dir():
            try:
                files += weight_files_of_folder(folder)[0]
            except MtoolError:
                continue
    return files


def _key_lines(node: yaml.Node | None, path: str = "") -> dict[str, int]:
    """Every key path of a YAML document (``models[0].parameters.weight``) with its 1-based line."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{path}{getattr(key, 'value', key)}"
            lines[name] = key.start_mark.line + 1
            lines.update(_key_lines(value, f"{name}."))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_key_lines(item, f"{path.removesuffix('.')}[{index}]."))
    return lines


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; every error names the file and line. The YAML is read within
    :mod:`mtool.safe_yaml`'s limits (size, depth, aliases, duplicate keys)."""
    return parse_recipe(read_text(path, what="recipe"), source=str(path))


def parse_recipe(text: str, *, source: str = "recipe") -> Recipe:
    document = load_yaml(text, source=source)
    data, node = document.data, document.node
    if not isinstance(data, dict):
        raise ConfigError("a recipe must be a YAML mapping with at least `merge_method`", where=source,
                          fix="see recipes/merge/ for examples")
    ignored: dict[str, str | None] = {}
    data = _drop_ignored_keys(data, Recipe, "", ignored)
    lines = _key_lines(node)
    try:
        recipe = Recipe.model_validate(data)
        recipe._ignored, recipe._lines, recipe._source = ignored, lines, source
        return recipe
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(first["loc"])
        line = line_of(node, location)
        key = printable(".".join(str(part) for part in location)[:200]) or "recipe"
        message = printable(first["msg"].removeprefix("Value error, "))[:300]
        fix = "see docs/merge.md for the recipe format"
        if first["type"] == "extra_forbidden":
            message = f"unknown key {shown(location[-1], 60)}"
        elif first["type"] == "missing":
            message = f"missing key {shown(location[-1], 60)}"
        typo = next(((path, known) for path, known in ignored.items() if known), None)
        if typo is not None and first["type"] in ("missing", "value_error"):  # what is missing is likely misspelt
            path, known = typo
            message += f"; `{printable(path)[:60]}` is not a recipe key"
            fix, line = f"did you mean `{known}`?", lines.get(path, line)
        where = f"{source}, line {line}" if line else source
        raise ConfigError(f"{key}: {message}", where=where, fix=fix) from None
