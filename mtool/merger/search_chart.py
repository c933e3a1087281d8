"""The chart of a search: each trial's score, the best score so far, and the trial that was kept."""

from __future__ import annotations

from pathlib import Path

from mtool.lineage import SearchRecord


def write_search_chart(path: str | Path, record: SearchRecord) -> Path:
    """A PNG: the score of every trial (dots), the best so far (a step line), the best trial circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trials = sorted(record.trials, key=lambda trial: trial.number)
    numbers = [trial.number for trial in trials]
    scores = [trial.score for trial in trials]
    best_so_far = [max(scores[: index + 1]) for index in range(len(scores))]
    best = next(trial for trial in trials if trial.number == record.best)
    figure, axes = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    axes.plot(numbers, scores, "o", color="C0", alpha=0.7, label="trial")
    axes.step(numbers, best_so_far, where="post", color="C1", label="best so far")
    axes.plot([best.number], [best.score], "o", markersize=12, markerfacecolor="none", color="C3",
              label=f"kept: trial {best.number}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel("score")
    axes.set_title(f"{record.optimizer}, seed {record.seed}: {len(trials)} trials", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
