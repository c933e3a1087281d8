"""The reconstruction report of ``extract`` and ``resize``: rank and relative error per module, and overall.

A module's relative error is ``||dW - B @ A||_F / ||dW||_F``; the overall error is the same ratio over all
modules together, ``sqrt(sum of squared errors) / sqrt(sum of squared norms)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModuleFit:
    module: str
    rank: int
    error_sq: float  # ||dW - B @ A||_F^2
    norm_sq: float  # ||dW||_F^2

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


@dataclass
class FitReport:
    modules: list[ModuleFit] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        total = sum(m.norm_sq for m in self.modules)
        return math.sqrt(sum(m.error_sq for m in self.modules) / total) if total > 0 else 0.0

    def metrics(self) -> dict[str, object]:
        """For the lineage record."""
        return {"relative_error": self.relative_error,
                "modules": {m.module: {"rank": m.rank, "relative_error": m.relative_error} for m in self.modules}}

    def format(self, *, limit: int | None = 12) -> str:
        """A table of the modules, worst first (``limit`` rows; None for all), and the overall error."""
        rows = sorted(self.modules, key=lambda m: m.relative_error, reverse=True)
        shown = rows if limit is None else rows[:limit]
        width = max([len("module")] + [len(m.module) for m in shown])
        lines = [f"{'module':<{width}}  rank  relative error"]
        lines += [f"{m.module:<{width}}  {m.rank:>4}  {m.relative_error:.3e}" for m in shown]
        if len(rows) > len(shown):
            lines.append(f"... {len(rows) - len(shown)} more modules (all are in mtool-lineage.json; -v lists them)")
        ranks = sorted({m.rank for m in self.modules})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        lines.append(f"overall: {len(self.modules)} modules, rank {rank_text}, "
                     f"relative error {self.relative_error:.3e}")
        return "\n".join(lines)
