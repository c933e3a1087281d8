"""Small YAML settings files (an evaluation spec, a search space) read into pydantic models, with errors that
name the file, the key and its line."""

from __future__ import annotations

import os
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from mtool.errors import ConfigError
from mtool.safe_yaml import line_of, load_yaml, read_text

Model = TypeVar("Model", bound=BaseModel)


def _data_location(data: object, location: tuple) -> tuple:
    """``location`` without the parts that are not in the data: the tags pydantic inserts for a member of a
    tagged union (``tasks.0.exact_match.data`` -> ``tasks.0.data``)."""
    kept = []
    for index, part in enumerate(location):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        elif isinstance(data, dict) and index + 1 < len(location):
            continue
        else:
            data = None
        kept.append(part)
    return tuple(kept)


def parse_yaml_model(text: str, model: type[Model], *, source: str, guide: str | None = None) -> Model:
    """``text`` (YAML) validated as ``model``; a malformed file or value is a :class:`ConfigError` naming
    ``source``, the key and its line (``guide`` says where the keys are documented)."""
    document = load_yaml(text, source=source)  # bounded, and errors name the line
    data, node = document.data, document.node
    if not isinstance(data, dict):
        raise ConfigError("the file must be a YAML mapping of keys to values", where=source, fix=guide)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = _data_location(data, tuple(first["loc"]))
        key = ".".join(str(part) for part in location) or "file"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown key {location[-1]!r}"
        elif first["type"] == "missing":
            message = f"missing key {location[-1]!r}"
        line = line_of(node, location)
        raise ConfigError(f"{key}: {message}", where=f"{source}, line {line}" if line else source, fix=guide) from None


def load_yaml_model(path: str | os.PathLike, model: type[Model], *, what: str = "settings file",
                    guide: str | None = None) -> Model:
    """Read ``path`` (a ``what``, at most as long as :func:`mtool.safe_yaml.read_text` allows) and validate it as
    ``model`` (see :func:`parse_yaml_model`)."""
    text = read_text(path, what=what)
    return parse_yaml_model(text, model, source=str(path), guide=guide)
