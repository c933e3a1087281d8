"""Reading untrusted text files: a bounded number of bytes, UTF-8 checked with the line of the first bad byte."""

from __future__ import annotations

import os
from pathlib import Path

from mtool.errors import InputError


def read_bounded(path: str | os.PathLike, *, what: str, max_bytes: int, fix: str,
                 error: type[InputError] = InputError) -> bytes:
    """At most ``max_bytes`` bytes of ``path``: a larger file (``/dev/zero`` included) is refused, never read whole."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as failure:
        raise error(f"cannot read the {what}: {failure.strerror or type(failure).__name__}", where=str(path),
                    fix="check the path and its permissions") from None
    if len(raw) > max_bytes:
        raise error(f"the {what} is larger than {max_bytes:,} bytes", where=str(path), fix=fix)
    return raw


def decode_utf8(raw: bytes, *, what: str, where: str, error: type[InputError] = InputError,
                fix: str = "save the file as UTF-8", first_line: int = 1) -> str:
    """``raw`` (which starts on line ``first_line`` of its file) as UTF-8 text; a byte that is not is refused with
    its value and line (``where, line N``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as failure:
        line = raw.count(b"\n", 0, failure.start) + first_line
        raise error(f"the {what} is not UTF-8 text (byte 0x{raw[failure.start]:02x} cannot be decoded)",
                    where=f"{where}, line {line}", fix=fix) from None


def read_utf8(path: str | os.PathLike, *, what: str, max_bytes: int, fix: str,
              error: type[InputError] = InputError) -> str:
    """:func:`read_bounded`, then :func:`decode_utf8`."""
    raw = read_bounded(path, what=what, max_bytes=max_bytes, fix=fix, error=error)
    return decode_utf8(raw, what=what, where=str(Path(path)), error=error)
