"""The demo's steps: each one what an ordinary mtool command does (the same library function, called in this
process), printed as the user would type the command.

    base -> train capitals QLoRA ---> adapters merge -> capitals fine-tune --+--> merge linear / slerp / ties / dare_ties
         -> train symbols QLoRA  ---> adapters merge -> symbols fine-tune  --+--> merge --search (TIES parameters,
         (both adapters) ------------> adapters combine (cat) -> one adapter        tuned on the tune questions)
    then: every model scored on every skill's held-out questions (mtool eval, results into each lineage and
    card), every output named (schema), carded and linted.

Every output folder is renamed to its standardized name as soon as it is written, before anything reads it,
so lineage records and cards point at the final paths.
"""  # noqa: E501

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mtool import ui
from mtool.demo.base import BaseSettings, make_demo_base
from mtool.demo.recipes import write_eval_spec, write_merge_recipe, write_search_space, write_train_config
from mtool.demo.report import Row
from mtool.demo.tasks import SPLITS, all_tasks, general_task, skill_tasks, split_task, tokenizer_corpus
from mtool.errors import OutputExistsError
from mtool.io.hashing import FileHasher
from mtool.naming.label import label_from_words
from mtool.runtime import torch_threads

MARKER = "mtool-demo.json"  # marks a folder as a demo output, so --force may replace it


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and merges. :meth:`quick` is the reduced run the tests use."""

    facts_per_skill: int | None = None  # None: all 40
    base: BaseSettings = field(default_factory=BaseSettings)
    adapter_steps: int = 150
    adapter_lr: float = 1e-2
    adapter_rank: int = 16
    batch_size: int = 34
    density: float = 0.8  # TIES and DARE-TIES: share of each task vector kept
    search_trials: int = 20  # trials of the searched merge
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSettings:
        return cls(facts_per_skill=8, base=BaseSettings(steps=60, seed=seed), adapter_steps=60, search_trials=4,
                   seed=seed)

    def with_seed(self, seed: int) -> DemoSettings:
        return replace(self, seed=seed, base=replace(self.base, seed=seed))


@dataclass
class DemoResult:
    folder: Path
    rows: list[Row]
    tasks: list[str]
    names: dict[str, str]  # output folder name -> "ok" or the lint findings
    seconds: dict[str, float]


def prepare_folder(out: Path, *, force: bool) -> Path:
    """Create ``out``, marked as a demo folder at once (so a run that fails half-way can be replaced).

    An existing ``out`` is refused unless ``force`` and it is an earlier demo's folder, finished or not; it is
    then removed first (the models inside record their own paths, so the new run cannot be built elsewhere and
    swapped in). Any other folder is never touched.
    """
    out = out.resolve()
    if out.exists():
        if not force:
            raise OutputExistsError(f"the output {out} already exists", fix="choose another folder or pass --force")
        if not (out / MARKER).is_file():
            raise OutputExistsError(f"{out} exists and is not a folder written by `mtool demo`",
                                    fix="choose another folder (--force only replaces an earlier demo's folder)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _write_marker(out, complete=False)
    return out


def _write_marker(out: Path, *, complete: bool, settings: DemoSettings | None = None) -> None:
    data = {"complete": complete, **({"settings": asdict(settings)} if settings is not None else {})}
    (out / MARKER).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def name_output(folder: Path, label: str | None) -> Path:
    """Rename ``folder`` to its standardized name (from its lineage record, with Label ``label``, else the one
    the record suggests) and write its card under that name."""
    from mtool.naming.card import write_card
    from mtool.naming.suggest import suggest_name

    name = str(suggest_name(folder, label=label))
    target = folder.with_name(name)
    if target.exists():
        raise OutputExistsError(f"two demo outputs would both be named {name}", where=str(folder))
    folder.rename(target)
    write_card(target, name=name)
    return target


class Steps:
    """Numbered, timed steps printed as they run."""

    def __init__(self, total: int, cwd: Path) -> None:
        self.total, self.done, self.cwd, self.seconds = total, 0, cwd, {}

    def run(self, title: str, action: Callable[[], object], command: list[str] | None = None):
        self.done += 1
        ui.info(f"[{self.done}/{self.total}] {title}")
        if command is not None:
            ui.info("    $ mtool " + " ".join(shlex.quote(self._short(a)) for a in command))
        start = time.perf_counter()
        result = action()
        self.seconds[title] = round(time.perf_counter() - start, 2)
        written = f": {self._short(str(result))} (its standardized name)" if isinstance(result, Path) else ""
        ui.info(f"    done in {self.seconds[title]:.1f} s{written}")
        return result

    def _short(self, argument: str) -> str:
        try:
            return os.path.relpath(argument, self.cwd) if os.path.isabs(argument) else argument
        except ValueError:
            return argument


def run_demo(out: str | os.PathLike, settings: DemoSettings = DemoSettings(), *, force: bool = False) -> DemoResult:
    """Run the whole demo into ``out`` (see the module docstring); returns the accuracy rows.

    Its models are tiny: every operation is a few microseconds of math, and a second torch thread only adds the
    cost of waking and synchronising it (spinning, on a busy machine), so the whole run uses one (measured: one
    pre-training step of the demo base, 48 x 17 tokens, took 7x the CPU time on two threads)."""
    with torch_threads(1):
        return _run_demo(out, settings, force=force)


def _run_demo(out: str | os.PathLike, settings: DemoSettings, *, force: bool) -> DemoResult:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    out = prepare_folder(Path(out), force=force)
    skills = skill_tasks(settings.facts_per_skill)
    general = general_task()
    merge_methods = ("linear", "slerp", "ties", "dare_ties")
    steps = Steps(total=1 + 2 * len(skills) + len(merge_methods) + 4, cwd=Path.cwd())
    data = out / "data"
    data.mkdir()
    files = {task.name: task.write_jsonl(data / f"{task.name}.jsonl") for task in (*skills, general)}
    recipes = out / "recipes"
    recipes.mkdir()
    specs = {split: write_eval_spec(recipes / f"eval-{split}.yaml",
                                    {task.name: split_task(task)[split].write_questions(data / f"{task.name}-{split}"
                                                                                                ".jsonl")
                                     for task in all_tasks(skills)},
                                    f"exact match on the {split} half of every task's questions")
             for split in SPLITS}

    base = out / "base"
    steps.run(f"pre-train a tiny base model on {len(general.pairs)} general facts ({settings.base.steps} steps)",
              lambda: make_demo_base(base, tokenizer_corpus([*skills, general]), general, settings.base))

    hasher = FileHasher.default()  # one for the whole run: every input is hashed once
    adapters: dict[str, Path] = {}
    fine_tunes: dict[str, Path] = {}
    for task in skills:
        label, output = label_from_words([task.name]), out / f"{task.name}-adapter"
        config = write_train_config(recipes / f"train-{task.name}.yaml", base, output,
                                     [files[task.name], files[general.name]], out / "checkpoints" / task.name,
                                     settings)
        adapters[task.name] = steps.run(
            f"train a QLoRA adapter on {task.name} ({len(task.pairs)} facts + the general facts replayed)",
            lambda config=config, output=output, label=label: _write(lambda: _train(config, hasher), output, label),
            ["train", str(config)])
        adapter, output = adapters[task.name], out / f"{task.name}-merged"
        fine_tunes[task.name] = steps.run(
            f"merge the {task.name} adapter into the base",
            lambda adapter=adapter, output=output, label=label: _write(
                lambda: _merge_adapter(base, adapter, output, hasher), output, label),
            ["adapters", "merge", str(base), str(adapter), str(output), "--dtype", "float32"])

    both = label_from_words([task.name for task in skills])
    merges: dict[str, Path] = {}
    for method in merge_methods:
        recipe = write_merge_recipe(recipes / f"merge-{method}.yaml", method, base, fine_tunes, settings)
        output = out / f"merge-{method}"
        merges[method] = steps.run(
            f"merge the two fine-tunes: {method}",
            lambda recipe=recipe, output=output: _write(lambda: _merge(recipe, output, settings.seed, hasher),
                                                        output, both),
            ["merge", str(recipe), str(output), "--seed", str(settings.seed)])
    space = write_search_space(recipes / "search-space.yaml", len(fine_tunes))
    output = out / "merge-searched"
    searched = steps.run(
        f"search TIES parameters for the merge with the best score on the tune questions ({settings.search_trials} "
        "trials)",
        lambda: _write(lambda: _search(recipes / "merge-ties.yaml", space, specs["tune"], output, settings, hasher),
                       output, label_from_words([*(task.name for task in skills), "searched"])),
        ["merge", str(recipes / "merge-ties.yaml"), str(output), "--search", str(space), "--eval",
         str(specs["tune"]), "--trials", str(settings.search_trials), "--seed", str(settings.seed)])
    inputs = [adapters[task.name] for task in skills]
    weights = tuple(0.5 for _ in inputs)
    output = out / "adapters-cat"
    combined = steps.run("combine the two adapters in adapter space (cat, weights 0.5 each)",
                         lambda: _write(lambda: _combine(inputs, output, weights, hasher), output, both),
                         ["adapters", "combine", *(str(a) for a in inputs), str(output), "--method", "cat",
                          "--weights", ",".join(f"{w:g}" for w in weights)])

    models = [Row("base", "base", "base", "base", {})]
    models += [Row("fine-tune", f"{name} fine-tune", path.name, path.name, {}) for name, path in fine_tunes.items()]
    labels = {"linear": "Linear merge", "slerp": "SLERP merge", "ties": "TIES merge", "dare_ties": "DARE-TIES merge"}
    models += [Row("merge", labels[method], path.name, path.name, {}) for method, path in merges.items()]
    models.append(Row("merge", "searched TIES merge", searched.name, searched.name, {}))
    models.append(Row("adapters", "adapters combined", combined.name, combined.name, {}))
    tasks = all_tasks(skills)
    rows = steps.run(f"score {len(models)} models on the held-out questions of {len(tasks)} tasks (exact match, "
                     "greedy)", lambda: _score(out, base, models, specs["heldout"]),
                     ["eval", *(str(out / row.folder) for row in models), "--spec", str(specs["heldout"])])
    names = steps.run("lint every output's name against its folder",
                      lambda: _lint([*adapters.values(), *fine_tunes.values(), *merges.values(), searched,
                                     combined]))

    from mtool.demo.report import write_chart, write_results

    task_names = [task.name for task in tasks]
    write_results(out, rows, task_names, {"settings": asdict(settings), "seconds": steps.seconds, "names": names})
    write_chart(out / "accuracy.png", rows, task_names)
    _write_marker(out, complete=True, settings=settings)
    return DemoResult(out, rows, task_names, names, steps.seconds)


def _write(action: Callable[[], object], output: Path, label: str | None) -> Path:
    """Run a step that writes ``output`` (its own messages silenced unless -v); return the folder under its
    standardized name."""
    with ui.quiet_unless_verbose():
        action()
    return name_output(output, label)


def _train(config_file: Path, hasher: FileHasher) -> None:
    """``mtool train CONFIG_FILE``."""
    from mtool.train.config import load_config
    from mtool.train.run import train

    config = load_config(config_file)
    config.check_trainable()
    train(config, hasher=hasher)


def _merge_adapter(base: Path, adapter: Path, output: Path, hasher: FileHasher) -> None:
    """``mtool adapters merge BASE ADAPTER OUTPUT --dtype float32``."""
    import torch

    from mtool.adapters.merge import AdapterMergeOptions, merge_adapters

    merge_adapters(str(base), [str(adapter)], output, AdapterMergeOptions(dtype=torch.float32), hasher=hasher)


def _merge(recipe: Path, output: Path, seed: int, hasher: FileHasher) -> None:
    """``mtool merge RECIPE OUTPUT --seed SEED``."""
    from mtool.merger.plan import build_plan
    from mtool.merger.recipe import load_recipe
    from mtool.merger.run import MergeOptions, execute

    execute(build_plan(load_recipe(recipe)), output, MergeOptions(seed=seed), hasher=hasher)


def _search(recipe: Path, space: Path, spec: Path, output: Path, settings: DemoSettings,
            hasher: FileHasher) -> None:
    """``mtool merge RECIPE OUTPUT --search SPACE --eval SPEC --trials N --seed SEED``."""
    from mtool.evaluate.spec import load_eval_spec
    from mtool.merger.recipe import load_recipe
    from mtool.merger.search import SearchOptions, search
    from mtool.merger.space import load_space

    search(load_recipe(recipe), load_space(space), load_eval_spec(spec), output,
           SearchOptions(trials=settings.search_trials, seed=settings.seed), hasher=hasher)


def _combine(adapters: list[Path], output: Path, weights: tuple[float, ...], hasher: FileHasher) -> None:
    """``mtool adapters combine ADAPTER... OUTPUT --method cat --weights W,...``."""
    from mtool.adapters.combine import CombineOptions, combine_adapters

    combine_adapters([str(a) for a in adapters], output, CombineOptions(method="cat", weights=weights), hasher=hasher)


def _score(out: Path, base: Path, models: list[Row], spec_file: Path) -> list[Row]:
    """``mtool eval MODEL... --spec SPEC``: every model (adapters on the base) on the held-out questions; the
    results go into each model's lineage record and card."""
    from mtool.evaluate.run import EvalOptions, evaluate_models
    from mtool.evaluate.spec import load_eval_spec

    spec = load_eval_spec(spec_file)
    with ui.quiet_unless_verbose(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices, not the user's concern here
        results = evaluate_models([str(out / row.folder) for row in models], spec, EvalOptions(base=str(base)))
    return [replace(row, accuracy={task.task: task.value for task in result.tasks})
            for row, result in zip(models, results)]


def _lint(folders: list[Path]) -> dict[str, str]:
    from mtool.naming.lint import lint_name

    results = {}
    for folder in folders:
        report = lint_name(folder.name, folder)
        results[folder.name] = "ok" if not report.findings else "; ".join(f.message for f in report.findings)
    return results
