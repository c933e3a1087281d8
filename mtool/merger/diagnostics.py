"""What a recipe says that mergekit accepts and ignores: a warning each (mergekit is silent), an error with
``--strict``.

mergekit 0.1.5 reads only the keys and parameters it knows: a misspelt key, a parameter the merge method does not
have (``weight`` for SCE), a whole-tensor parameter written under one model (``t`` for SLERP), a parameter the
method never reads for the base model (TIES' ``weight``), a slice's ``residual_weight``: all are dropped without a
word. mtool computes the same model and says what it dropped, once per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtool import ui
from mtool.errors import ConfigError


@dataclass
class Diagnostics:
    """Collects the warnings of one plan; with ``strict`` the first one is a :class:`ConfigError` instead."""

    strict: bool = False
    messages: list[str] = field(default_factory=list)

    def ignored(self, what: str, *, where: str, fix: str | None = None) -> None:
        """Report something the recipe says that changes nothing (mergekit ignores it too)."""
        if self.strict:
            raise ConfigError(what, where=where, fix=fix or "remove it (--strict refuses what mergekit ignores)")
        self.note(f"{what} ({where})" + (f"; {fix}" if fix else ""))

    def note(self, message: str) -> None:
        """A warning that is not an error even with ``--strict`` (printed once)."""
        if message not in self.messages:
            self.messages.append(message)
            ui.warn(message)
