"""Errors a user can act on.

Every failure mtool reports is an :class:`MtoolError`: one message that says what went wrong, where
(a file, a tensor, a recipe key) and what to do about it. The CLI prints it without a traceback and
exits with the error's ``exit_code``.
"""

from __future__ import annotations


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
