"""Merge recipes: mergekit's YAML, validated into typed objects, with errors that name the line.

A recipe names a ``merge_method`` and its inputs either as ``models`` (whole models) or as ``slices`` (each a
list of ``sources`` with a ``layer_range [start, end)``), plus an optional ``base_model``, ``parameters``
(global; also per model / per source / per slice), ``dtype`` (the precision inputs are read at),
``out_dtype``, ``tokenizer_source`` / ``tokenizer``, and ``chat_template``.

Model references are strings ``path_or_hub_id[@revision][+adapter_path_or_hub_id]``: ``+`` applies a LoRA
adapter to the model on the fly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from mtool.errors import ConfigError, printable, shown
from mtool.safe_yaml import load_yaml, read_text

ParameterSetting = Any  # scalar | gradient list | [{filter, value}] (validated in params.py)
MAX_REFERENCE_CHARS = 4096  # PATH_MAX on Linux: a longer path or Hub id names nothing


class ModelReference(BaseModel):
    """``model[@revision][+adapter]`` as written in a recipe."""

    model_config = ConfigDict(frozen=True)

    model: str
    revision: str | None = None
    adapter: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelReference":
        text = str(text).strip()
        if not text:
            raise ValueError("empty model reference")
        _check_reference_text(text)
        model, _, adapter = text.partition("+")
        revision = None
        if "@" in model and not _exists(model):
            model, _, revision = model.rpartition("@")
        return cls(model=model, revision=revision or None, adapter=adapter or None)

    @model_serializer
    def _as_text(self) -> str:
        return str(self)

    def __str__(self) -> str:
        text = self.model + (f"@{self.revision}" if self.revision else "")
        return text + (f"+{self.adapter}" if self.adapter else "")


def _check_reference_text(text: str) -> None:
    if len(text) > MAX_REFERENCE_CHARS or "\0" in text:
        raise ValueError(f"a model reference is a path or a Hub id (at most {MAX_REFERENCE_CHARS} characters, no "
                         f"NUL character), got {len(text):,} characters: {shown(text, 60)}")


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, or unreadable: not an existing path
        return False


def _reference(value: Any) -> ModelReference:
    if isinstance(value, ModelReference):
        return value
    if isinstance(value, dict) and "model" in value:  # mergekit's expanded form {model: {path: ...}, lora: ...}
        model = value["model"]
        path = model.get("path") if isinstance(model, dict) else model
        revision = model.get("revision") if isinstance(model, dict) else None
        lora = value.get("lora")
        adapter = lora.get("path") if isinstance(lora, dict) else lora
        if not isinstance(path, str) or not isinstance(revision, (str, type(None))) \
                or not isinstance(adapter, (str, type(None))):
            raise ValueError(f"a model reference's path, revision and lora must be strings, got {shown(value)}")
        for part in (path, revision, adapter):
            _check_reference_text(part or "")
        return ModelReference(model=path, revision=revision, adapter=adapter)
    if not isinstance(value, str):
        raise ValueError(f"a model reference must be a string, got {shown(value)}")
    return ModelReference.parse(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One entry of a recipe's ``models:`` list."""

    model: ModelReference
    parameters: dict[str, ParameterSetting] | None = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: _reference(v))


class InputSlice(_Strict):
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: _reference(v))

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

    _parse_base = field_validator("base_model", mode="before")(lambda cls, v: None if v is None else _reference(v))

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers, got "
                             f"{shown(sorted(lengths))}")
        return self


def _reference_text(value: Any, keywords: tuple[str, ...] = ()) -> Any:
    """A string naming a model (or one of ``keywords``), checked as a model reference."""
    if isinstance(value, str) and value not in keywords:
        ModelReference.parse(value)
    return value


class TokenSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Union[str, dict, None] = None  # a model reference, or {kind: zero}
    force: bool = False

    _check_source = field_validator("source")(lambda cls, v: _reference_text(v))


class TokenizerSettings(_Strict):
    source: str | None = None  # "base", "union" or a model reference
    tokens: dict[str, TokenSource] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)

    _check_source = field_validator("source")(lambda cls, v: _reference_text(v, ("base", "union")))


class Recipe(_Strict):
    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    base_model: ModelReference | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None  # mergekit accepts and ignores a recipe name
    modules: dict[str, Any] | None = None

    _parse_base = field_validator("base_model", mode="before")(lambda cls, v: None if v is None else _reference(v))
    _check_tokenizer_source = field_validator("tokenizer_source")(
        lambda cls, v: _reference_text(v, ("base", "union")))

    @model_validator(mode="after")
    def _one_input_form(self) -> "Recipe":
        if self.modules:
            raise ValueError("`modules:` (multi-module architectures) is not supported; use `models:` or `slices:`")
        if bool(self.models) == bool(self.slices):
            raise ValueError("give either `models:` or `slices:` (exactly one of them)")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either `tokenizer_source:` or a `tokenizer:` block, not both")
        return self

    @property
    def tokenizer_choice(self) -> str | None:
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    def referenced_models(self) -> list[ModelReference]:
        """Every distinct model the recipe reads, in order of first mention (the base first)."""
        seen: dict[ModelReference, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for entry in self.models or []:
            seen[entry.model] = None
        for output_slice in self.slices or []:
            if output_slice.base_model:
                seen[output_slice.base_model] = None
            for source in output_slice.sources:
                seen[source.model] = None
        return list(seen)

    def canonical(self) -> dict[str, Any]:
        """The recipe as plain data, without unset keys (for the lineage record and the card)."""
        return self.model_dump(mode="json", exclude_none=True)


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


def _line_of(node: yaml.Node | None, location: tuple) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in location:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
            match, marked = (pair[1], pair[0]) if pair else (None, None)  # a key's line is where the key is
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = marked = node.value[key]
        else:
            match = marked = None
        if match is None:
            break
        node = match
        line = marked.start_mark.line + 1
    return line


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
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(first["loc"])
        line = _line_of(node, location)
        key = printable(".".join(str(part) for part in location)[:200]) or "recipe"
        message = printable(first["msg"].removeprefix("Value error, "))[:300]
        fix = "see docs/merge.md for the recipe format"
        if first["type"] == "extra_forbidden":
            message = f"unknown key {shown(location[-1], 60)}"
        elif first["type"] == "missing":
            message = f"missing key {shown(location[-1], 60)}"
        where = f"{source}, line {line}" if line else source
        raise ConfigError(f"{key}: {message}", where=where, fix=fix) from None
