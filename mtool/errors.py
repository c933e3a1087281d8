"""Errors a user can act on.

Every failure mtool reports is an :class:`MtoolError`: one message that says what went wrong, where
(a file, a tensor, a recipe key) and what to do about it. The CLI prints it without a traceback and
exits with the error's ``exit_code``, on one line: :func:`printable` escapes line breaks and control characters.

Values taken from inputs (a tensor name, a recipe value) go into messages through :func:`shown`, which bounds
what it formats: a hostile input cannot make a message huge, or slow to build.
"""

from __future__ import annotations

import reprlib


class MtoolError(Exception):
    """Base class: ``what`` went wrong, ``where`` it happened, ``fix`` is what the user can do."""

    exit_code: int = 1

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = self.what
        if self.where:
            text = f"{text} ({self.where})"
        if self.fix:
            text = f"{text}. {self.fix}"
        return text


class InputError(MtoolError):
    """An input (model folder, adapter, data file, option value) is missing or unusable."""

    exit_code = 2


class CheckpointError(InputError):
    """A weight file or model folder cannot be read: missing, corrupt, truncated or in an unsafe format."""


class UnsafeWeightsError(CheckpointError):
    """Pickle-based weights (``.bin``, ``.pt``) that mtool refuses to load by default."""


class OutputExistsError(MtoolError):
    """The output path exists and ``--force`` was not given, or it would overwrite an input."""

    exit_code = 3


class ConfigError(InputError):
    """A recipe or a training config is malformed or has an invalid value."""


class ComputeError(MtoolError):
    """The computation produced an invalid result (NaN/Inf, a shape the plan did not expect)."""

    exit_code = 4


class DiskError(MtoolError):
    """The output cannot be written: a read-only or unwritable folder, or not enough free space."""

    exit_code = 5


class _BoundedRepr(reprlib.Repr):
    """``reprlib`` limits (few levels, items and characters); integers too long for ``repr`` are described."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = 80, 60, 40

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 128:
            return f"<a {value.bit_length()}-bit integer>"
        return super().repr_int(value, level)


_REPR = _BoundedRepr()


def shown(value: object, limit: int = 100) -> str:
    """``repr(value)`` bounded: a few levels and items of containers, strings cut to 80 characters, the whole at
    most ``limit`` characters, on one line. The work done is bounded too (a structure of shared references that
    would expand to gigabytes is visited only as far as it is shown)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is described by its type
        text = f"<{type(value).__name__}>"
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """``text`` safe to print on one line of a terminal: line breaks, control and format characters escaped
    (``\\n``, ``\\x1b``, ``\\u202e``), and bytes that were not valid UTF-8 (kept by Python as lone surrogates)
    shown as ``\\xNN``."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else _escaped(character) for character in text)


def _escaped(character: str) -> str:
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def kind_of(value: object) -> str:
    """What a JSON/YAML value is, for messages: "a string", "a number", "a list", "an object", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
