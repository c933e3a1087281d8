"""Which optimizer `mtool merge --search` uses: Optuna's TPE against CMA-ES (the `cma` package), on the demo's models.

    .venv/bin/python benchmarks/search_bench.py [--demo DIR] [--trials 30] [--seeds 0,1,2]

Both optimizers search the demo's space (TIES: each fine-tune's weight and density, lambda, normalize) with the
same trials: the same merge into a scratch folder, the same evaluation on the demo's tune questions, the same
score. TPE runs as mtool ships it (``mtool.merger.search.search``: its study file, per-trial seeds, the recipe as
written for its first trial); CMA-ES asks for populations of points in the unit cube (the space's ranges scaled to
[0, 1], a choice as a coordinate cut into equal parts; started at the recipe as written, sigma 0.3, bounds enforced
by `cma`) and is told each population's scores. For each optimizer and seed the table gives the best tune score
after 10, 20 and all trials, the held-out score of the merge each would write (its best trial; the first of equal
scores), and the wall-clock and CPU seconds per trial; then the mean over the seeds, beside the demo's fixed
recipes on the held-out questions. Needs `cma` (`pip install cma`) besides the test extras.

``--demo DIR`` is a finished ``mtool demo`` folder; without it the demo is run once into benchmarks/_work/search.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / "benchmarks" / "_work" / "search"


class UnitTrial:
    """A stand-in Optuna trial that maps the next coordinate of a point in [0, 1]^d to each range in turn."""

    def __init__(self, point) -> None:
        self.point = list(point)
        self.params: dict[str, float] = {}

    def suggest_float(self, name: str, low: float, high: float, log: bool = False, step: float | None = None):
        value = low + min(1.0, max(0.0, self.point.pop(0))) * (high - low)
        self.params[name] = value
        return value

    def suggest_categorical(self, name: str, choices: list):
        """A choice as a coordinate: [0, 1] cut into equal parts, one per choice."""
        index = min(len(choices) - 1, int(min(1.0, max(0.0, self.point.pop(0))) * len(choices)))
        self.params[name] = choices[index]
        return choices[index]


class RangeTrial:
    """A stand-in trial that records each range asked for (in order)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[str, float, float] | tuple[str, list]] = []

    def suggest_float(self, name: str, low: float, high: float, log: bool = False, step: float | None = None):
        self.ranges.append((name, low, high))
        return low

    def suggest_categorical(self, name: str, choices: list):
        self.ranges.append((name, choices))
        return choices[0]


def start_point(space) -> list[float]:
    """The recipe as written in unit coordinates (where TPE's first trial is), else the centre of the cube."""
    recorder = RangeTrial()
    space.suggest(recorder)
    written = space.written_params()
    if written is None:
        return [0.5] * len(recorder.ranges)
    point = []
    for name, *bounds in recorder.ranges:
        if len(bounds) == 1:  # a choice: the middle of its part of [0, 1]
            point.append((bounds[0].index(written[name]) + 0.5) / len(bounds[0]))
        else:
            point.append((written[name] - bounds[0]) / (bounds[1] - bounds[0]))
    return point


def demo_folder(given: str | None) -> Path:
    if given:
        return Path(given).resolve()
    from mtool.demo.pipeline import DemoSettings, run_demo

    folder = WORK / "demo"
    if not (folder / "results.json").is_file():
        run_demo(folder, DemoSettings(), force=True)
    return folder


def heldout_score(folder: Path, spec) -> float:
    from mtool import ui
    from mtool.evaluate.results import objective
    from mtool.evaluate.run import EvalOptions, evaluate_models

    with ui.quiet_unless_verbose():
        (result,) = evaluate_models([str(folder)], spec, EvalOptions(record=False))
    return objective(result.tasks, {task.name: task.weight for task in spec.tasks})


def run_tpe(demo: Path, trials: int, seed: int, heldout) -> dict:
    from mtool import ui
    from mtool.evaluate.spec import load_eval_spec
    from mtool.lineage import read_lineage
    from mtool.merger.recipe import load_recipe
    from mtool.merger.search import SearchOptions, search
    from mtool.merger.space import load_space

    out, study = WORK / f"tpe-{seed}", WORK / f"tpe-{seed}.search.jsonl"
    study.unlink(missing_ok=True)
    started, cpu = time.perf_counter(), time.process_time()
    with ui.quiet_unless_verbose():
        search(load_recipe(demo / "recipes" / "merge-ties.yaml"), load_space(demo / "recipes" / "search-space.yaml"),
               load_eval_spec(demo / "recipes" / "eval-tune.yaml"), out,
               SearchOptions(trials=trials, seed=seed, study=study, force=True))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    scores = [trial.score for trial in read_lineage(out).search.trials]
    result = {"scores": scores, "heldout": heldout_score(out, heldout), "seconds_per_trial": seconds / trials,
              "cpu_seconds_per_trial": cpu / trials}
    shutil.rmtree(out)
    return result


def run_cma(demo: Path, trials: int, seed: int, heldout) -> dict:
    import cma

    from mtool import ui
    from mtool.evaluate.results import objective
    from mtool.evaluate.run import prepare_tasks
    from mtool.evaluate.spec import load_eval_spec
    from mtool.io.hashing import FileHasher
    from mtool.merger.plan import build_plan
    from mtool.merger.recipe import load_recipe
    from mtool.merger.run import MergeOptions, execute
    from mtool.merger.search import SearchOptions, TrialRunner
    from mtool.merger.space import BoundSpace, load_space

    hasher = FileHasher.default()
    space = BoundSpace(load_space(demo / "recipes" / "search-space.yaml"),
                       load_recipe(demo / "recipes" / "merge-ties.yaml"))
    spec = load_eval_spec(demo / "recipes" / "eval-tune.yaml")
    weights = {task.name: task.weight for task in spec.tasks}
    scratch = WORK / f"cma-{seed}-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    runner = TrialRunner(spec, prepare_tasks(spec, hasher), scratch, SearchOptions(seed=seed), hasher)
    strategy = cma.CMAEvolutionStrategy(start_point(space), 0.3,
                                        {"bounds": [0, 1], "seed": seed + 1, "verbose": -9})
    scores: list[float] = []
    recipes = []
    started, cpu = time.perf_counter(), time.process_time()
    while len(scores) < trials:
        points = strategy.ask()
        told = []
        for point in points:
            if len(scores) == trials:
                break
            recipe = space.apply(space.suggest(UnitTrial(point)))
            with ui.quiet_unless_verbose():
                results, _ = runner.run(recipe, len(scores))
            told.append(objective(results, weights))
            scores.append(told[-1])
            recipes.append(recipe)
        if len(told) == len(points):
            strategy.tell(points, [-score for score in told])  # cma minimizes
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    best = max(range(trials), key=lambda index: (scores[index], -index))
    out = WORK / f"cma-{seed}"
    with ui.quiet_unless_verbose():
        execute(build_plan(recipes[best]), out, MergeOptions(seed=seed, force=True, write_card=False), hasher=hasher)
    result = {"scores": scores, "heldout": heldout_score(out, heldout), "seconds_per_trial": seconds / trials,
              "cpu_seconds_per_trial": cpu / trials}
    shutil.rmtree(out)
    shutil.rmtree(scratch)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", help="a finished `mtool demo` folder (default: run one into benchmarks/_work)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    arguments = parser.parse_args()
    from mtool.evaluate.spec import load_eval_spec

    WORK.mkdir(parents=True, exist_ok=True)
    demo = demo_folder(arguments.demo)
    heldout = load_eval_spec(demo / "recipes" / "eval-heldout.yaml")
    seeds = [int(seed) for seed in arguments.seeds.split(",")]
    runs: dict[str, list[dict]] = {"Optuna TPE": [], "CMA-ES (cma)": []}
    for seed in seeds:
        for name, run in (("Optuna TPE", run_tpe), ("CMA-ES (cma)", run_cma)):
            result = run(demo, arguments.trials, seed, heldout)
            runs[name].append(result)
            print(json.dumps({"optimizer": name, "seed": seed, **result}), file=sys.stderr, flush=True)

    def best_after(scores: list[float], count: int) -> float:
        return max(scores[:count])

    marks = sorted({min(10, arguments.trials), min(20, arguments.trials), arguments.trials})
    print("| optimizer | seed | " + " | ".join(f"best tune score, {m} trials" for m in marks)
          + " | held-out score of the merge written | s per trial (CPU s) |")
    print("|---|---:|" + "---:|" * (len(marks) + 2))
    for name, results in runs.items():
        for seed, result in zip(seeds, results):
            cells = [f"{best_after(result['scores'], m):.3f}" for m in marks]
            print(f"| {name} | {seed} | " + " | ".join(cells) + f" | {result['heldout']:.3f} | "
                  f"{result['seconds_per_trial']:.2f} ({result['cpu_seconds_per_trial']:.2f}) |")
        means = [statistics.mean(best_after(r["scores"], m) for r in results) for m in marks]
        print(f"| {name} | mean | " + " | ".join(f"{value:.3f}" for value in means)
              + f" | {statistics.mean(r['heldout'] for r in results):.3f} | "
              f"{statistics.mean(r['seconds_per_trial'] for r in results):.2f} "
              f"({statistics.mean(r['cpu_seconds_per_trial'] for r in results):.2f}) |")
    fixed = json.loads((demo / "results.json").read_text())
    print("\nThe demo's fixed recipes on the held-out questions (mean over the tasks):")
    for row in fixed["rows"]:
        if row["kind"] == "merge" and "searched" not in row["label"]:
            print(f"- {row['label']}: {statistics.mean(row['accuracy'].values()):.3f}")


if __name__ == "__main__":
    main()
