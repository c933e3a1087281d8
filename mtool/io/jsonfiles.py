"""JSON files that come with weights (``config.json``, ``adapter_config.json``, shard indexes), read with bounds.

A file is read only up to a size no such file reaches (``MAX_JSON_BYTES``), must be UTF-8, valid JSON and an
object at the top; anything else is a :class:`~mtool.errors.CheckpointError` naming the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtool.errors import CheckpointError, kind_of
from mtool.io.text import decode_utf8, read_bounded

MAX_JSON_BYTES = 64 * 1024 * 1024  # a shard index of a 1T-parameter model is a few MB


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
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"the {what} is not valid JSON: {error.msg.lower()}",
                              where=f"{where}, line {error.lineno}", fix=fix) from None
    except (ValueError, RecursionError):  # an integer of 4,300+ digits; nesting deeper than Python's stack
        raise CheckpointError(f"the {what} is not JSON mtool can read (a huge number or deep nesting)",
                              where=where, fix=fix) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"the {what} must be a JSON object, not {kind_of(data)}", where=where, fix=fix)
    return data
