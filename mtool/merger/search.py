"""``mtool merge RECIPE OUT --search SPACE --eval EVAL --trials N``: the recipe's parameters searched for the best
evaluation score.

Each trial: Optuna's TPE sampler (the optimizer chosen by measurement, see docs/eval.md) proposes a value for
every dimension of the space (the first trial takes the recipe's own values when the space can give them, so the
search starts from the recipe as written), the recipe with those values is merged (streamed, by the same library code as
``mtool merge``) into a scratch folder, the merge is evaluated (:mod:`mtool.evaluate`) and its score, the
weighted mean of the tasks' scores, is told to the sampler; the scratch model is deleted before the next trial,
so the disk never holds more than one. At the end the best trial's recipe is merged again into OUT, which gets
the search record, the best trial's evaluations and a chart of the score per trial in its lineage and card; its
weights are checked to be byte for byte the ones the trial scored.

Determinism and resuming: trials live in a study file (Optuna's journal, one JSON line per event) beside OUT.
The sampler of the k-th trial is seeded from ``(seed, k)`` and sees the trials before it, so a search gives the
same trials for a seed, and an interrupted one, run again with the same command, carries on where it stopped
(a trial cut short is run again) and ends as the uninterrupted search would have. A trial whose merge is not
finite (e.g. weights summing to zero) counts as a failed trial; any other error stops the search.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtool import ui
from mtool.errors import ComputeError, InputError, OutputExistsError
from mtool.evaluate.results import TaskResult, objective
from mtool.evaluate.spec import EvalSpec
from mtool.io.folders import check_output_target
from mtool.io.hashing import FileHasher
from mtool.lineage import Evaluation, SearchRecord, SearchTrial, read_lineage
from mtool.merger.recipe import Recipe
from mtool.merger.space import BoundSpace, SearchSpace
from mtool.seeding import hashed_seed

OPTIMIZER = "Optuna TPE"
STUDY_NAME = "mtool-merge-search"
INSTALL = "install Optuna with `pip install 'mtool[search]'`"


@dataclass(frozen=True)
class SearchOptions:
    trials: int = 30
    seed: int = 0  # of the sampler and of the merges' random methods
    study: Path | None = None  # default: OUT.search.jsonl beside OUT
    scratch: Path | None = None  # where trial merges are written (default: beside OUT)
    device: str = "cpu"  # where the merge math runs (the evaluation device is the spec's)
    max_shard_bytes: int | None = None
    force: bool = False
    write_card: bool = True


@dataclass
class TrialResult:
    """What a trial left: its values, recipe, score, evaluations and the sha256 of its weights."""

    position: int
    params: dict[str, Any]
    recipe: dict[str, Any]
    score: float
    scores: dict[str, float]
    evaluations: list[dict[str, Any]]
    outputs: dict[str, str]
    seconds: float
    written: bool = False  # the recipe's own values (the first trial)

    def record(self) -> SearchTrial:
        """The trial as the lineage record keeps it (numbered from 1)."""
        return SearchTrial(number=self.position + 1, params=self.params, score=self.score, scores=self.scores,
                           recipe=self.recipe, outputs=self.outputs)


@dataclass
class SearchResult:
    out: Path
    best: TrialResult
    trials: list[TrialResult]
    new_trials: int  # run by this call (the others came from the study file)
    seconds: float = field(default=0.0)


def study_path(out: Path, options: SearchOptions) -> Path:
    return options.study or out.with_name(out.name + ".search.jsonl")


class _Centre:
    """A stand-in trial that picks the middle of each range, or its ends, for checking the space up front."""

    def __init__(self, where: str) -> None:
        self.where = where

    def suggest_float(self, name: str, low: float, high: float, log: bool = False, step: float | None = None):
        if self.where == "low":
            return low
        if self.where == "high":
            return high
        return math.sqrt(low * high) if log else (low + high) / 2

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return choices[-1] if self.where == "high" else choices[0]


def check_space(space: BoundSpace) -> int:
    """Plan the recipe with the space's lowest, middle and highest values (every error before a trial runs);
    returns the bytes a merge writes."""
    from mtool.merger.plan import build_plan

    sizes = []
    for where in ("low", "middle", "high"):
        plan = build_plan(space.apply(space.suggest(_Centre(where))))
        sizes.append(sum(tensor.numel * tensor.out_dtype.itemsize for tensor in plan.tensors))
    return max(sizes)


@dataclass
class TrialRunner:
    """Merges a recipe into the scratch folder, evaluates it and deletes it: what every trial shares."""

    spec: EvalSpec
    prepared: list
    scratch: Path
    options: SearchOptions
    hasher: FileHasher

    def run(self, recipe: Recipe, position: int) -> tuple[list[TaskResult], dict[str, str]]:
        """The evaluation of ``recipe``'s merge and the sha256 of its weights (the merge itself is deleted)."""
        from mtool.evaluate.run import load_and_score
        from mtool.merger.plan import build_plan
        from mtool.merger.run import MergeOptions, execute

        folder = self.scratch / f"trial-{position}"
        options = MergeOptions(seed=self.options.seed, device=self.options.device, write_card=False)
        if self.options.max_shard_bytes:
            options.max_shard_bytes = self.options.max_shard_bytes
        try:
            with ui.quiet_unless_verbose():
                execute(build_plan(recipe), folder, options, hasher=self.hasher)
                outputs = read_lineage(folder).outputs
                results = load_and_score(str(folder), self.prepared, self.spec, base=None, hasher=self.hasher).results
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return results, outputs


def _open_study(path: Path, fingerprint: str) -> tuple[Any, Any]:
    """The study stored in ``path`` (created if absent) and its storage; refused when it holds another search."""
    try:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
    except ImportError:
        raise InputError("--search needs Optuna, which is not installed", fix=INSTALL) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", load_if_exists=True)
    saved = study.user_attrs.get("fingerprint")
    if saved is None and not study.trials:
        study.set_user_attr("fingerprint", fingerprint)
    elif saved != fingerprint:
        raise OutputExistsError("the study file holds another search (its recipe, space, evaluation, data or seed "
                                "differ)",
                                where=str(path), fix="delete it to start over, or pass --study with another file")
    return storage, study


def _fingerprint(recipe: Recipe, space: SearchSpace, spec: EvalSpec, prepared: list, seed: int) -> str:
    """What a study belongs to: the recipe, space, evaluation (and its data's sha256), seed and optimizer."""
    import hashlib
    import json

    data = {"recipe": recipe.canonical(), "space": space.as_dict(), "evaluation": spec.as_dict(), "seed": seed,
            "optimizer": OPTIMIZER, "data": [task.data.dataset.sha256 for task in prepared if task.data is not None]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _finished(study: Any) -> dict[int, Any]:
    """Position -> the trial that filled it: complete, or failed by its values (an interrupted one does not)."""
    from optuna.trial import TrialState

    filled = {}
    for trial in study.get_trials(deepcopy=False):
        position = trial.user_attrs.get("position")
        if position is None:
            continue
        if trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and trial.user_attrs.get("failed")):
            filled.setdefault(position, trial)
    return filled


def _release_stale(study: Any) -> None:
    """Trials left running by an interrupted search are marked failed (they are run again)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)


def _sampler(seed: int, position: int) -> Any:
    from optuna.samplers import TPESampler

    return TPESampler(seed=hashed_seed(seed, "search", position) % 2**32, multivariate=True, constant_liar=False)


def _trial_result(trial: Any) -> TrialResult:
    attrs = trial.user_attrs
    return TrialResult(position=attrs["position"], params=dict(trial.params), recipe=attrs["recipe"],
                       score=trial.value, scores=attrs["scores"], evaluations=attrs["evaluations"],
                       outputs=attrs["outputs"], seconds=attrs["seconds"])


def _run_one(storage: Any, space: BoundSpace, runner: TrialRunner, position: int, seed: int) -> TrialResult | None:
    """Ask, merge, evaluate, tell; None for a trial whose merge is not finite."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=_sampler(seed, position))
    written = space.written_params() if position == 0 else None
    if written is not None and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial(written)  # the first trial is the recipe as written, when the space can give it
    trial = study.ask()
    trial.set_user_attr("position", position)
    started = time.perf_counter()
    try:
        recipe = space.apply(space.suggest(trial))
        trial.set_user_attr("recipe", recipe.canonical())
        results, outputs = runner.run(recipe, position)
    except ComputeError as error:
        trial.set_user_attr("failed", error.what)
        study.tell(trial, state=TrialState.FAIL)
        ui.warn(f"trial {position + 1} failed: {error.what}")
        return None
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)  # interrupted: run again on resume
        raise
    weights = {task.name: task.weight for task in runner.spec.tasks}
    result = TrialResult(position=position, params=dict(trial.params), recipe=recipe.canonical(),
                         score=objective(results, weights), scores={r.task: r.value for r in results},
                         evaluations=[r.evaluation(None).model_dump(mode="json") for r in results], outputs=outputs,
                         seconds=round(time.perf_counter() - started, 3),
                         written=written is not None and dict(trial.params) == written)
    for name in ("scores", "evaluations", "outputs", "seconds"):
        trial.set_user_attr(name, getattr(result, name))
    study.tell(trial, result.score)
    return result


def objective_text(spec: EvalSpec) -> str:
    """The score in words: ``the weighted mean of capitals (accuracy, weight 1), ...``."""
    measures = {"exact_match": "accuracy", "multiple_choice": "accuracy", "perplexity": "minus the mean token loss",
                "lm_eval": "its headline metric"}
    parts = [f"{task.name} ({measures[task.kind]}, weight {task.weight:g})" for task in spec.tasks if task.weight > 0]
    return "the weighted mean of " + ", ".join(parts)


def search(recipe: Recipe, space: SearchSpace, spec: EvalSpec, out: str | Path, options: SearchOptions, *,
           hasher: FileHasher | None = None) -> SearchResult:
    """Run (or resume) the search and write the best merge into ``out`` (see the module docstring)."""
    from mtool.evaluate.run import prepare_tasks

    out = check_output_target(Path(out), force=options.force,
                              inputs=[reference.model for reference in recipe.referenced_models()])
    hasher = hasher or FileHasher.default()
    bound = BoundSpace(space, recipe)
    merge_bytes = check_space(bound)
    scratch_parent = options.scratch or out.parent
    scratch_parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch_parent).free
    if free < merge_bytes * 1.05:
        raise InputError(f"a trial's merge needs {merge_bytes / 2**30:.2f} GiB of disk and {scratch_parent} has "
                         f"{free / 2**30:.2f} GiB free", fix="free some disk or pass --scratch on another disk")
    prepared = prepare_tasks(spec, hasher)
    path = study_path(out, options)
    storage, study = _open_study(path, _fingerprint(recipe, space, spec, prepared, options.seed))
    _release_stale(study)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.search-", dir=scratch_parent))
    runner = TrialRunner(spec, prepared, scratch, options, hasher)
    new = 0
    gc.freeze()  # what lives now lives through the search: each trial's collection then sees only its own objects
    try:
        done = _finished(study)
        if done:
            ui.info(f"resuming the search in {path}: {min(len(done), options.trials)} of {options.trials} trials done")
        for position in range(options.trials):
            if position in done:
                continue
            result = _run_one(storage, bound, runner, position, options.seed)
            new += 1
            _report_trial(position, options.trials, result, _finished(study))
    finally:
        gc.unfreeze()
        shutil.rmtree(scratch, ignore_errors=True)
    trials = [_trial_result(trial) for position, trial in sorted(_finished(study).items())
              if position < options.trials and trial.value is not None]
    if not trials:
        raise ComputeError("every trial failed: no merge to write", fix="narrow the space's ranges")
    best = max(trials, key=lambda trial: (trial.score, -trial.position))
    elapsed = time.perf_counter() - started
    _write_best(bound, spec, best, trials, out, options, hasher)
    return SearchResult(out, best, trials, new, elapsed)


def _report_trial(position: int, total: int, result: TrialResult | None, done: dict[int, Any]) -> None:
    if result is None:
        return
    scored = [trial for trial in done.values() if trial.value is not None]
    best = max(scored, key=lambda trial: (trial.value, -trial.user_attrs["position"]))
    values = ", ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                       for name, value in result.params.items())
    as_written = " (the recipe as written)" if result.written else ""
    ui.info(f"trial {position + 1}/{total}: score {result.score:.4f} (best {best.value:.4f}, trial "
            f"{best.user_attrs['position'] + 1}) in {result.seconds:.1f} s; {values}{as_written}")


def _write_best(space: BoundSpace, spec: EvalSpec, best: TrialResult, trials: list[TrialResult], out: Path,
                options: SearchOptions, hasher: FileHasher) -> None:
    """Merge the best trial's recipe into ``out`` with the search record, its evaluations and the chart; check
    the weights are the ones the trial scored."""
    from mtool.merger.plan import build_plan
    from mtool.merger.run import MergeOptions, execute
    from mtool.merger.search_chart import write_search_chart
    from mtool.naming.card_results import SEARCH_CHART

    record = SearchRecord(optimizer=OPTIMIZER, seed=options.seed, objective=objective_text(spec),
                          space=space.space.as_dict(), evaluation=spec.as_dict(),
                          trials=[trial.record() for trial in trials], best=best.position + 1)

    def annotate(staging: Path, lineage: Any) -> None:
        lineage.search = record
        lineage.evaluations = [Evaluation.model_validate(data) for data in best.evaluations]
        write_search_chart(staging / SEARCH_CHART, record)

    merge_options = MergeOptions(seed=options.seed, device=options.device, force=options.force,
                                 write_card=options.write_card, annotate=annotate)
    if options.max_shard_bytes:
        merge_options.max_shard_bytes = options.max_shard_bytes
    execute(build_plan(Recipe.model_validate(best.recipe)), out, merge_options, hasher=hasher)
    written = read_lineage(out).outputs
    if written != best.outputs:
        raise ComputeError(f"the best recipe merged again gave other bytes than trial {best.position + 1}",
                           where=str(out), fix="report this: merges are meant to be reproducible")
