"""JSON files that come with weights (``config.json``, ``adapter_config.json``, shard indexes), read with bounds.

A file is read only up to a size no such file reaches (``MAX_JSON_BYTES``), must be UTF-8, valid JSON and an
object at the top; anything else is a :class:`~mtool.errors.CheckpointError` naming the file and the line.

:func:`loads` is the JSON parser for untrusted text everywhere (these files, safetensors headers, training data):
Python's, refusing what it alone accepts: strings with a lone surrogate escape (``"\\ud800"``: not Unicode, and
unwritable as UTF-8 later), and on request repeated keys and the ``NaN``/``Infinity`` constants.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtool.errors import CheckpointError, kind_of, shown
from mtool.io.text import decode_utf8, read_bounded

MAX_JSON_BYTES = 64 * 1024 * 1024  # a shard index of a 1T-parameter model is a few MB


class JsonRefusal(ValueError):
    """Valid JSON to Python that :func:`loads` refuses; ``what`` says why."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def check_strings(value: Any) -> None:
    """Refuse a string (or strings in a list, at any depth) that is not Unicode: a lone surrogate escape."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise JsonRefusal(f"the string {shown(value, 40)} holds a lone surrogate escape, not Unicode") \
                    from None
    elif isinstance(value, list):
        for item in value:
            check_strings(item)


def _refuse_constant(name: str) -> Any:
    raise JsonRefusal(f"{name} is not JSON")


def decoder(*, unique_keys: bool = False, constants: bool = True) -> json.JSONDecoder:
    """A JSON decoder for untrusted text (module docstring); the strings of an object are checked as it is built
    (top-level strings and lists: :func:`check_strings`)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            check_strings(key)
            check_strings(value)
            if unique_keys and key in result:
                raise JsonRefusal(f"the key {shown(key, 80)} appears twice")
            result[key] = value
        return result

    return json.JSONDecoder(object_pairs_hook=pairs, parse_constant=None if constants else _refuse_constant)


def loads(text: str, *, unique_keys: bool = False, constants: bool = True) -> Any:
    """``json.loads`` for untrusted text (module docstring); raises JSONDecodeError, JsonRefusal (both ValueError)
    or RecursionError."""
    data = decoder(unique_keys=unique_keys, constants=constants).decode(text)
    check_strings(data)
    return data


def read_json_object(path: str | os.PathLike, *, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` names the file in messages, e.g. "shard index")."""
    path = Path(path)
    fix = f"restore {path.name} from where the folder came from"
    raw = read_bounded(path, what=what, max_bytes=max_bytes, fix=fix, error=CheckpointError)
    return parse_json_object(raw, what=what, where=str(path), fix=fix)


def parse_json_object(raw: bytes, *, what: str, where: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``raw`` (the checks of :func:`read_json_object`, on bytes in memory)."""
    text = decode_utf8(raw, what=what, where=where, error=CheckpointError, fix=fix)
    try:
        data = loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"the {what} is not valid JSON: {error.msg.lower()}",
                              where=f"{where}, line {error.lineno}", fix=fix) from None
    except JsonRefusal as refusal:
        raise CheckpointError(f"the {what} is not valid JSON: {refusal.what}", where=where, fix=fix) from None
    except (ValueError, RecursionError):  # an integer of 4,300+ digits; nesting deeper than Python's stack
        raise CheckpointError(f"the {what} is not JSON mtool can read (a huge number or deep nesting)",
                              where=where, fix=fix) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"the {what} must be a JSON object, not {kind_of(data)}", where=where, fix=fix)
    return data
