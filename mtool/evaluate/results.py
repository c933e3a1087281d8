"""Evaluation results: per task and per model, the search objective, and how they are shown (a table, JSON, a
chart: one panel per task, one bar per model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtool.lineage import Dataset, Evaluation

PERCENT_METRICS = ("accuracy", "accuracy_norm", "acc", "acc_norm", "exact_match")


@dataclass(frozen=True)
class TaskResult:
    """One task's result for one model."""

    task: str
    kind: str
    metric: str  # the headline metric
    value: float
    higher_is_better: bool
    score: float  # what a search maximizes: the value, negated when lower is better (a loss for perplexity)
    metrics: dict[str, float]
    dataset: Dataset
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)  # per-example prompts, answers, verdicts

    def evaluation(self, base: str | None) -> Evaluation:
        """The result as the lineage record keeps it."""
        return Evaluation(task=self.task, kind=self.kind, metric=self.metric, value=self.value,
                          higher_is_better=self.higher_is_better, metrics=self.metrics, dataset=self.dataset,
                          base=base, settings=self.settings)

    def formatted(self) -> str:
        return f"{self.value:.1%}" if self.metric in PERCENT_METRICS else f"{self.value:.4g}"


@dataclass
class ModelResult:
    """Every task's result for one model (or adapter on its base)."""

    label: str
    folder: Path | None  # the local folder evaluated (the adapter's, for an adapter)
    base: str | None
    tasks: list[TaskResult]
    seconds: float
    recorded: bool = False  # the results were added to the folder's lineage record and card

    def task(self, name: str) -> TaskResult:
        return next(result for result in self.tasks if result.task == name)


def objective(tasks: Sequence[TaskResult], weights: dict[str, float]) -> float:
    """The weighted mean of the tasks' scores: ``sum_t w_t score_t / sum_t w_t``."""
    total = sum(weights[result.task] for result in tasks)
    return sum(weights[result.task] * result.score for result in tasks) / total


def text_table(results: Sequence[ModelResult]) -> str:
    """A fixed-width table: one row per model, one column per task (its headline metric)."""
    columns = [(result.task, f"{result.task} ({result.metric})") for result in results[0].tasks]
    label_width = max(len("model"), *(len(result.label) for result in results))
    widths = [max(10, len(title)) for _, title in columns]
    header = f"{'model':<{label_width}}" + "".join(f"  {title:>{width}}" for (_, title), width in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for result in results:
        cells = "".join(f"  {result.task(name).formatted():>{width}}" for (name, _), width in zip(columns, widths))
        lines.append(f"{result.label:<{label_width}}{cells}")
    return "\n".join(lines)


def as_json(results: Sequence[ModelResult], *, samples: bool = False) -> list[dict[str, Any]]:
    """Plain data for ``--json``: per model, per task, every metric (and the samples when asked)."""
    return [{
        "model": result.label, "folder": str(result.folder) if result.folder else None, "base": result.base,
        "seconds": round(result.seconds, 2), "recorded": result.recorded,
        "tasks": [{
            "task": task.task, "kind": task.kind, "metric": task.metric, "value": task.value,
            "higher_is_better": task.higher_is_better, "metrics": task.metrics,
            "data": task.dataset.model_dump(exclude_none=True), "settings": task.settings,
            **({"samples": task.samples} if samples else {}),
        } for task in result.tasks],
    } for result in results]


def write_chart(path: str | Path, results: Sequence[ModelResult], *, title: str = "mtool eval") -> Path:
    """A PNG with one panel per task: each model's headline metric as a bar (percent for accuracies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results[0].tasks
    figure, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.5 * len(results) + 2) * len(tasks), 4.0),
                                dpi=120, squeeze=False)
    labels = [result.label if len(result.label) <= 28 else "..." + result.label[-25:] for result in results]
    for panel, task in zip(axes[0], tasks):
        percent = task.metric in PERCENT_METRICS
        values = [result.task(task.task).value * (100 if percent else 1) for result in results]
        panel.bar(range(len(results)), values, color=[f"C{index % 10}" for index in range(len(results))])
        panel.set_xticks(range(len(results)), labels, rotation=30, ha="right", fontsize=7)
        direction = "higher is better" if task.higher_is_better else "lower is better"
        panel.set_title(f"{task.task}: {task.metric}{' (%)' if percent else ''}\n{direction}", fontsize=9)
        if percent:
            panel.set_ylim(0, 105)
        panel.grid(axis="y", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
