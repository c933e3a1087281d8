"""The bridge to lm-evaluation-harness (PyPI ``lm-eval``, the ``harness`` extra): one of its tasks run on a model
mtool has loaded, and its metrics returned as a :class:`TaskResult`.

``task`` is the path of a task YAML (its ``dataset_path: json`` / ``dataset_kwargs.data_files`` pointing at local
files), or the name of a task found in ``include`` folders (or among the harness's own tasks when no folder
is given). The model is handed over as it is loaded (device, dtype, adapter), through the harness's ``HFLM``
wrapper; nothing is downloaded (the data files are local) and no sample is cached between runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

from mtool import ui
from mtool.errors import ConfigError, InputError
from mtool.evaluate.models import LoadedModel
from mtool.evaluate.results import TaskResult
from mtool.evaluate.spec import HarnessTask
from mtool.io.hashing import FileHasher
from mtool.lineage import Dataset

INSTALL = "install it with `pip install 'mtool[harness]'` (lm-eval)"


def harness_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _task_name_and_paths(task: HarnessTask) -> tuple[str, list[Path], Path | None]:
    """The harness task's name, the folders its YAMLs are looked for in, and its YAML file when one is given."""
    paths = [Path(path).expanduser() for path in task.include]
    for path in paths:
        if not path.exists():
            raise InputError("an include folder of lm-eval tasks does not exist", where=f"{task.name}: {path}")
    candidate = Path(task.task).expanduser()
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise InputError("the lm-eval task file does not exist", where=f"{task.name}: {candidate}")
        try:
            name = (yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}).get("task")
        except (yaml.YAMLError, AttributeError):
            name = None
        if not isinstance(name, str):
            raise ConfigError("the lm-eval task file has no `task:` name", where=str(candidate))
        return name, [candidate.parent, *paths], candidate
    return task.task, paths, None


def _data_record(task: HarnessTask, task_file: Path | None, examples: int | None, hasher: FileHasher) -> Dataset:
    """The task's data for the lineage record: its YAML file and the local data files it names, hashed."""
    if task_file is None:
        return Dataset(id=f"lm-eval task {task.task}", examples=examples)
    config = yaml.safe_load(task_file.read_text(encoding="utf-8")) or {}
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    listed = list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files]
    named = [Path(str(item)) for value in listed for item in (value if isinstance(value, list) else [value])]
    digests = [hasher.sha256(task_file)] + [hasher.sha256(path) for path in named if path.is_file()]
    digest = hashlib.sha256("".join(f"{d}\n" for d in digests).encode()).hexdigest()
    return Dataset(id=str(task_file), sha256=digest, examples=examples, format="lm-eval")


@contextlib.contextmanager
def _progress_bars_unless_quiet() -> Iterator[None]:
    """The harness's own progress bars (stderr) while it runs, silenced by ``-q``."""
    if not ui.VERBOSITY.quiet:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def run_harness_task(loaded: LoadedModel, task: HarnessTask, *, batch_size: int, hasher: FileHasher) -> TaskResult:
    """Run ``task`` with lm-evaluation-harness on the loaded model."""
    if not harness_available():
        raise InputError(f"the task {task.name!r} needs lm-evaluation-harness, which is not installed", fix=INSTALL)
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name, include, task_file = _task_name_and_paths(task)
    datasets.disable_progress_bars()
    for logger in ("lm_eval", "lm-eval"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    manager = TaskManager(include_path=[str(path) for path in include] or None, include_defaults=not include)
    if name not in manager.all_tasks:
        raise InputError(f"lm-eval knows no task {name!r}", where=task.name,
                         fix="give the path of its YAML file, or the folder that holds it under include")
    model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    with _progress_bars_unless_quiet():
        output = simple_evaluate(model=model, tasks=[name], task_manager=manager, num_fewshot=task.num_fewshot,
                                 limit=task.limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    raw = output["results"][name]
    metrics = {key.split(",")[0]: float(value) for key, value in raw.items()
               if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    if not metrics:
        raise InputError(f"lm-eval's task {name!r} reported no metric", where=task.name)
    metric = task.metric or next(iter(metrics))
    if metric not in metrics:
        raise ConfigError(f"lm-eval's task {name!r} has no metric {metric!r} (it has {', '.join(metrics)})",
                          where=f"{task.name}: metric")
    higher = bool(output.get("higher_is_better", {}).get(name, {}).get(metric, True))
    examples = (output.get("n-samples") or {}).get(name, {}).get("effective")
    return TaskResult(task=task.name, kind="lm_eval", metric=metric, value=metrics[metric], higher_is_better=higher,
                      score=metrics[metric] if higher else -metrics[metric], metrics=metrics,
                      dataset=_data_record(task, task_file, examples, hasher),
                      settings={"lm_eval_task": name, "num_fewshot": task.num_fewshot, "batch_size": batch_size,
                                "lm_eval_version": _version()})


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
