"""What a card says about measured results: the evaluations of the folder (the front matter's ``model-index``,
which the Hub shows as the model's evaluation results, and an Evaluation section), and the search that chose a
merge's recipe (a Search section with its chart)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mtool.lineage import Evaluation, Lineage
from mtool.naming.publishable import display_reference

if TYPE_CHECKING:
    from huggingface_hub import EvalResult

SEARCH_CHART = "search.png"
TRIALS_SHOWN = 10
_METRIC_TYPES = {"exact_match": "accuracy", "multiple_choice": "accuracy", "perplexity": "perplexity"}
_METRIC_NAMES = {"exact_match": "exact match (greedy)", "multiple_choice": "multiple-choice accuracy",
                 "perplexity": "perplexity"}


def _data_name(evaluation: Evaluation) -> str:
    """The data set as model-index names it: a Hub id as such, local files by their names."""
    dataset = evaluation.dataset
    if dataset is None:
        return evaluation.task
    if dataset.is_hub:
        return dataset.id
    return ", ".join(Path(part.strip()).name for part in dataset.id.split(","))


def eval_results(lineage: Lineage) -> list["EvalResult"]:
    """The record's evaluations as ``huggingface_hub.EvalResult`` s (the card's ``model-index``)."""
    from huggingface_hub import EvalResult

    results = []
    for evaluation in lineage.evaluations or []:
        kind = evaluation.kind
        results.append(EvalResult(
            task_type="text-generation", task_name=evaluation.task,
            dataset_type=_data_name(evaluation), dataset_name=evaluation.task,
            metric_type=_METRIC_TYPES.get(kind, evaluation.metric),
            metric_name=_METRIC_NAMES.get(kind, evaluation.metric),
            metric_value=float(f"{evaluation.value:.4g}"),  # rounded for people; the record keeps every digit
        ))
    return results


def _value(evaluation: Evaluation) -> str:
    if evaluation.kind in ("exact_match", "multiple_choice"):
        return f"{evaluation.value:.1%}"
    return f"{evaluation.value:.4g}"


def evaluation_section(lineage: Lineage) -> list[str]:
    """A table of the record's evaluations (empty when there are none)."""
    if not lineage.evaluations:
        return []
    lines = ["## Evaluation", "", "Measured with `mtool eval` (greedy answers; losses as training computes them).", "",
             "| Task | Metric | Value | Data | Examples | sha256 | Evaluated |",
             "| --- | --- | ---: | --- | ---: | --- | --- |"]
    for evaluation in lineage.evaluations:
        dataset = evaluation.dataset
        examples = dataset.examples if dataset is not None and dataset.examples is not None else ""
        digest = f"`{dataset.sha256[:12]}`" if dataset is not None and dataset.sha256 else ""
        on = f" on `{display_reference(evaluation.base)}`" if evaluation.base else ""
        lines.append(f"| {evaluation.task} | {_METRIC_NAMES.get(evaluation.kind, evaluation.metric)} | "
                     f"{_value(evaluation)} | {_data_name(evaluation)} | {examples} | {digest} | "
                     f"{evaluation.created[:10]}{on} |")
    return lines + [""]


def search_section(lineage: Lineage, folder: Path) -> list[str]:
    """How the recipe was searched: optimizer, seed, objective, the best trials and the chart."""
    search = lineage.search
    if search is None:
        return []
    best = next(trial for trial in search.trials if trial.number == search.best)
    lines = ["## Search", "",
             f"The recipe above is trial {search.best} of {len(search.trials)} of a search with {search.optimizer} "
             f"(seed {search.seed}) that maximized {search.objective}; best score {best.score:.4g}. Each trial "
             "merged the recipe with the values below and evaluated the merge; `mtool merge` with a trial's recipe "
             "(every one is in `mtool-lineage.json`) writes the same bytes again.", ""]
    if (folder / SEARCH_CHART).is_file():
        lines += [f"![Score per trial]({SEARCH_CHART})", ""]
    ranked = sorted(search.trials, key=lambda trial: (-trial.score, trial.number))[:TRIALS_SHOWN]
    names = list(dict.fromkeys(name for trial in ranked for name in trial.params))
    lines += [f"The {len(ranked)} best trials:", "",
              "| Trial | Score | " + " | ".join(f"`{name}`" for name in names) + " |",
              "| ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for trial in ranked:
        values = [trial.params.get(name) for name in names]
        cells = " | ".join(f"{value:.4g}" if isinstance(value, float) else str(value) for value in values)
        lines.append(f"| {trial.number} | {trial.score:.4g} | {cells} |")
    return lines + [""]
