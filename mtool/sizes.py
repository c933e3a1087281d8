"""Byte sizes as users write them (``5GB``, ``500MB``, ``2GiB``), for options such as ``--shard-size``.

Decimal units are powers of 1000 (``GB``), binary ones powers of 1024 (``GiB``); a bare number is in the option's
own unit (bytes for ``--shard-size``, GiB for ``--gpu-memory``, as people say "a 24 GB card"). (Model size labels
such as ``8B`` parameters are another thing: :mod:`mtool.naming.size`.)
"""

from __future__ import annotations

import click

UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
         "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_byte_size(text: str, *, bare_unit: str = "B") -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1000000`` -> bytes, a bare number in ``bare_unit``; ValueError for anything
    else (or a size <= 0)."""
    cleaned = str(text).strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):] or bare_unit.upper()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 5GB or 500MB") from None
    if unit not in UNITS or value <= 0:
        raise ValueError(f"{text!r} is not a size like 5GB or 500MB")
    return int(value * UNITS[unit])


class ByteSize(click.ParamType):
    """A Click option type for byte sizes: the option's value arrives as an int of bytes; a bare number is in
    ``bare_unit``."""

    name = "size"

    def __init__(self, bare_unit: str = "B") -> None:
        self.bare_unit = bare_unit

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_byte_size(str(value), bare_unit=self.bare_unit)
        except ValueError as error:
            self.fail(str(error), param, ctx)


BYTE_SIZE = ByteSize()
GPU_MEMORY = ByteSize(bare_unit="GiB")


def format_byte_size(count: int) -> str:
    """``2_200_000_123`` -> ``"2,200,000,123 bytes (2.2 GB)"``: exact, with the decimal size people read."""
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if count >= scale:
            return f"{count:,} bytes ({count / scale:.3g} {unit})"
    return f"{count:,} bytes"
