"""What a run reports: one JSON line per step (and per evaluation), memory in use, and the loss curve.

``metrics.jsonl`` rows: ``{"step", "epoch", "loss", "lr", "grad_norm", "tokens", "trained_tokens",
"tokens_per_s", "memory_gib", "elapsed_s"}`` for training steps and ``{"step", "eval_loss", "eval_tokens"}``
for evaluations. A resumed run first drops the rows after its checkpoint's step, so the file always describes
one uninterrupted history.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class MetricsLog:
    """An append-only JSON Lines file of metric rows."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def keep_until(self, step: int) -> None:
        """Drop every row after ``step`` (a resumed run continues from there)."""
        kept = [row for row in self.rows() if row.get("step", 0) <= step]
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        os.replace(temporary, self.path)


SMOOTHING_FRACTION = 0.1  # the final training loss is the mean over the last tenth of the steps


def smoothed_final_loss(rows: list[dict[str, Any]], fraction: float = SMOOTHING_FRACTION) -> dict[str, Any]:
    """The run's final training loss for people: over the last ``n = max(1, ceil(fraction * steps))`` logged
    steps, ``sum_i loss_i t_i / sum_i t_i`` with ``t_i`` the step's trained tokens (each ``loss_i`` is already its
    step's token mean, so this is the token mean of those steps); the last step's loss alone is one micro-batch's
    noise. Returns ``{"train_loss": ..., "train_loss_window": "..."}``, or {} without logged steps."""
    steps = [row for row in rows if "loss" in row and math.isfinite(row["loss"])]
    if not steps:
        return {}
    window = steps[-max(1, math.ceil(fraction * len(steps))):]
    weights = [max(1, int(row.get("trained_tokens") or 1)) for row in window]
    loss = sum(row["loss"] * weight for row, weight in zip(window, weights)) / sum(weights)
    return {"train_loss": loss,
            "train_loss_window": f"token mean of the last {len(window)} of {len(steps)} steps"}


def memory_in_use_gib(device: "torch.device") -> float:
    """Peak memory so far: allocated tensor memory on CUDA, the process's peak resident set on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def plot_losses(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """A PNG of the training loss per step (and the evaluation loss, when measured); None without rows."""
    train = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    evaluated = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=110)
    axes.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evaluated:
        axes.plot(*zip(*evaluated), "o-", label="eval loss", linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (token mean)")
    if title:
        axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
