"""The demo's results: the accuracy table on the held-out questions (text and Markdown, with the mean over the
tasks), ``results.json`` and a bar chart PNG."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One evaluated model: what it is, its folder (relative to the demo folder) and its accuracy per task."""

    kind: str  # "base", "fine-tune", "merge", "adapters"
    label: str  # a short description: "capitals fine-tune", "TIES merge"
    name: str
    folder: str
    accuracy: dict[str, float]

    @property
    def mean(self) -> float:
        """The mean accuracy over the tasks (what a search maximizes on the tune questions)."""
        return sum(self.accuracy.values()) / len(self.accuracy)


def text_table(rows: list[Row], tasks: list[str]) -> str:
    """A fixed-width table for the terminal, accuracy in percent."""
    label_width = max(len("model"), *(len(row.label) for row in rows))
    header = f"{'model':<{label_width}}  " + "".join(f"{task:>10}" for task in [*tasks, "mean"]) + "    name"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{row.accuracy[task]:>10.0%}" for task in tasks) + f"{row.mean:>10.1%}"
        lines.append(f"{row.label:<{label_width}}  {cells}    {row.name}")
    return "\n".join(lines)


def markdown_table(rows: list[Row], tasks: list[str]) -> str:
    header = "| model | name | " + " | ".join([*tasks, "mean"]) + " |"
    rule = "|---|---|" + "---:|" * (len(tasks) + 1)
    body = ["| " + " | ".join([row.label, f"`{row.name}`", *(f"{row.accuracy[t]:.0%}" for t in tasks),
                               f"{row.mean:.1%}"]) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def write_results(folder: Path, rows: list[Row], tasks: list[str], extra: dict) -> None:
    """``results.json`` (rows plus ``extra``: settings and timings) and ``results.md`` in ``folder``."""
    data = {"tasks": tasks, "rows": [asdict(row) for row in rows], **extra}
    (folder / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    title = "# mtool demo: exact-match accuracy on the held-out questions\n\n"
    (folder / "results.md").write_text(title + markdown_table(rows, tasks) + "\n", encoding="utf-8")


def write_chart(path: Path, rows: list[Row], tasks: list[str]) -> Path:
    """A grouped bar chart: one group per model, one bar per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2), dpi=120)
    width = 0.8 / len(tasks)
    for index, task in enumerate(tasks):
        positions = [r + (index - (len(tasks) - 1) / 2) * width for r in range(len(rows))]
        axes.bar(positions, [100 * row.accuracy[task] for row in rows], width, label=task)
    axes.set_xticks(range(len(rows)), [row.label for row in rows], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("exact-match accuracy, held-out questions (%)")
    axes.set_ylim(0, 118)
    axes.set_title("mtool demo: each skill, before and after merging")
    axes.legend(fontsize=8, loc="upper center", ncol=len(tasks), frameon=False)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path

