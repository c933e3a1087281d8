"""The safetensors header, validated as strictly as the safetensors library validates it, and then some.

A safetensors file is ``<u64 little-endian N> <N bytes of UTF-8 JSON> <data>``. The JSON is an object: each key
names a tensor, ``{"dtype": "BF16", "shape": [4096, 4096], "data_offsets": [begin, end]}`` with offsets relative
to the data; the optional ``"__metadata__"`` is a map of strings to strings. What a header must satisfy here:

- the JSON is valid UTF-8 and strict (no ``NaN``/``Infinity``), an object, no key given twice at any level
  (safetensors keeps the last of two equal tensor names; two readers could then disagree on which is meant);
- ``__metadata__`` is absent, ``null`` or a map of strings to strings;
- every tensor entry is an object with ``dtype`` one of safetensors' dtype strings, ``shape`` a list of
  non-negative integers and ``data_offsets`` two non-negative integers (integers below 2**64, booleans refused);
- ``(end - begin) * 8 == prod(shape) * bits(dtype)``, a whole number of bytes, computed without overflow;
- sorted by offset, the byte ranges tile the data exactly: the first begins at 0, each begins where the one
  before ends (no gap, no overlap: one tensor's bytes can never be read as another's), and the last ends at the
  end of the file (a longer range is a truncated download; bytes after it are refused as safetensors refuses them).

Every refusal is a :class:`~mtool.errors.CheckpointError` naming the file (and the tensor), bounded in length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from mtool.errors import CheckpointError, kind_of, shown
from mtool.io.dtypes import element_bits
from mtool.io.jsonfiles import JsonRefusal, loads

USIZE_LIMIT = 1 << 64  # safetensors reads shapes and offsets as 64-bit unsigned integers
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
REWRITE = "download or write the file again"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a header: byte range relative to the start of the data."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _corrupt(what: str, where: str) -> CheckpointError:
    return CheckpointError(f"corrupt safetensors header: {what}", where=where, fix=REWRITE)


def decode_header_json(raw: bytes, where: str) -> dict[str, Any]:
    """The header's JSON object (strict: see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _corrupt(f"it is not UTF-8 text (byte {error.start} of the header)", where) from None
    try:
        header = loads(text, unique_keys=True, constants=False)
    except JsonRefusal as refusal:  # a key twice, NaN, a lone surrogate escape
        raise _corrupt(refusal.what, where) from None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; so are integers of 4,300+ digits
        raise _corrupt("it is not valid JSON", where) from None
    if not isinstance(header, dict):
        raise _corrupt(f"it is {kind_of(header)}, not a JSON object", where)
    return header


def _metadata(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _corrupt(f"__metadata__ must map strings to strings, got {shown(value, 80)}", where)
    return value


def _count(value: Any) -> int | None:
    """``value`` as a safetensors usize (a non-negative integer below 2**64, not a boolean), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < USIZE_LIMIT:
        return value
    return None


def _elements(shape: list[int]) -> int | None:
    """The product of ``shape``, or None as soon as a partial product reaches 2**64 (safetensors' checked
    multiplication; stopping there also bounds the work a hostile shape of huge sizes can cause)."""
    elements = 1
    for size in shape:
        elements *= size
        if elements >= USIZE_LIMIT:
            return None
    return elements


def _entry(name: str, value: Any, where: str) -> HeaderEntry:
    label = f"tensor {shown(name, 80)}"
    if not isinstance(value, dict):
        raise _corrupt(f"{label} is described by {kind_of(value)}, not an object", where)
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in value]
    if missing:
        raise _corrupt(f"{label} has no {missing[0]}", where)
    dtype_name, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype_name, str) or element_bits(dtype_name) is None:
        raise _corrupt(f"{label} has dtype {shown(dtype_name, 40)}, not a safetensors dtype (F32, BF16, ...)", where)
    if not isinstance(shape, list) or any(_count(size) is None for size in shape):
        raise _corrupt(f"{label} has shape {shown(shape, 80)}: it must be a list of non-negative integers", where)
    if not isinstance(offsets, list) or len(offsets) != 2 or any(_count(offset) is None for offset in offsets):
        raise _corrupt(f"{label} has data_offsets {shown(offsets, 80)}: they must be two non-negative integers",
                       where)
    begin, end = offsets
    elements = _elements(shape)
    bits = None if elements is None else elements * element_bits(dtype_name)
    if bits is None or bits >= USIZE_LIMIT * 8:
        raise _corrupt(f"{label}: shape {shown(shape, 80)} overflows a 64-bit byte count", where)
    if bits % 8:
        raise _corrupt(f"{label}: {elements} elements of {dtype_name} do not fill whole bytes", where)
    if end < begin or end - begin != bits // 8:
        raise _corrupt(f"{label} ({dtype_name}, shape {shown(shape, 80)}) needs {bits // 8} bytes but its "
                       f"data_offsets are [{begin}, {end})", where)
    return HeaderEntry(name, dtype_name, tuple(shape), begin, end)


def header_length(prefix: bytes, file_size: int, *, where: str) -> int:
    """The header's length from the file's first 8 bytes, checked to fit the file and safetensors' limit."""
    if len(prefix) < 8:
        raise CheckpointError("not a safetensors file: shorter than its 8-byte header length", where=where,
                              fix=REWRITE)
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise CheckpointError(f"corrupt or truncated safetensors file: header length {length} does not fit in "
                              f"{file_size} bytes", where=where, fix=REWRITE)
    return length


def parse_file_bytes(blob: bytes, *, where: str) -> tuple[list[HeaderEntry], dict[str, str]]:
    """The header of a whole safetensors file held in memory (what the file reader does, without the file)."""
    length = header_length(blob[:8], len(blob), where=where)
    return parse_header(blob[8:8 + length], len(blob) - 8 - length, where=where)


def parse_header(raw: bytes, data_size: int, *, where: str) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Validate the header bytes of a file whose data (what follows the header) is ``data_size`` bytes long.

    Returns the tensors in file order and the metadata; raises :class:`CheckpointError` (module docstring).
    """
    header = decode_header_json(raw, where)
    metadata = _metadata(header.pop("__metadata__", None), where)
    entries = sorted((_entry(name, value, where) for name, value in header.items()),
                     key=lambda entry: (entry.begin, entry.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            relation = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            raise _corrupt(f"tensor {shown(entry.name, 80)} at bytes [{entry.begin}, {entry.end}) {relation} (the "
                           f"data up to it ends at byte {position})", where)
        position = entry.end
    if position > data_size:
        last = entries[-1]
        raise CheckpointError(f"truncated safetensors file: tensor {shown(last.name, 80)} ends at data byte "
                              f"{position} but the file holds {data_size} bytes of data", where=where, fix=REWRITE)
    if position < data_size:
        raise _corrupt(f"the file has {data_size - position} bytes after the last tensor's data", where)
    return entries, metadata
