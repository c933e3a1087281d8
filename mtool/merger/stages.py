"""Multi-stage recipes (mergekit-multi's format): one file, several YAML documents, each an ordinary recipe with
an optional ``name:``; a recipe uses an earlier stage's output by writing its name where a model goes
(``model:``, ``base_model:``, ``tokenizer_source:``, a token's ``source``).

Stages run in the order their references require (a cycle is an error). The stage without a name, or else the
one no other stage uses, is the result and goes to OUT; the others are written to a temporary folder beside OUT
and removed afterwards, or kept in ``--intermediate-dir``, where a stage whose recorded recipe is unchanged is
reused instead of merged again. Every stage runs with the same ``--seed``. The result's lineage record holds
every stage's recipe, and, through its parents' own records, every intermediate model's lineage.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtool import ui
from mtool.errors import ConfigError, OutputExistsError
from mtool.merger.recipe import Recipe, parse_recipe
from mtool.safe_yaml import load_yaml

_SEPARATOR = re.compile(r"^---\s*$", re.MULTILINE)
_REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass
class Stage:
    name: str | None
    text: str  # the document as written
    recipe: Recipe  # validated, references to other stages still by name
    needs: set[str]  # the stages it reads


def _documents(text: str) -> list[tuple[int, str]]:
    """``(first line, text)`` of every non-empty YAML document of ``text``."""
    pieces, starts, last = [], [], 0
    for match in _SEPARATOR.finditer(text):
        pieces.append(text[last:match.start()])
        starts.append(text.count("\n", 0, last) + 1)
        last = match.end()
    pieces.append(text[last:])
    starts.append(text.count("\n", 0, last) + 1)
    return [(start, piece) for start, piece in zip(starts, pieces) if _data(piece) is not None]


def _data(text: str, source: str = "recipe") -> Any:
    """A document's data, read within :mod:`mtool.safe_yaml`'s limits."""
    return load_yaml(text, source=source).data


def is_multi_stage(text: str) -> bool:
    try:
        return len(_documents(text)) > 1
    except ConfigError:
        return False


def _stage_of(value: str, names: set[str]) -> str | None:
    base = value.split("+", 1)[0].split("@", 1)[0]
    return base if base in names else None


def _rewrite(data: Any, names: set[str], folders: dict[str, Path], found: set[str]) -> Any:
    """``data`` with every model reference to a stage replaced by that stage's folder (``found`` collects them)."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key in _REFERENCE_KEYS and isinstance(value, str) and (stage := _stage_of(value, names)):
                found.add(stage)
                value = str(folders[stage]) + value[len(stage):] if stage in folders else value
            out[key] = _rewrite(value, names, folders, found)
        return out
    if isinstance(data, list):
        return [_rewrite(item, names, folders, found) for item in data]
    return data


def parse_stages(text: str, *, source: str) -> list[Stage]:
    """The stages of a multi-document recipe, each validated, in the order they must run (the result last)."""
    documents = _documents(text)
    stages = []
    for line, document in documents:
        recipe = parse_recipe("\n" * (line - 1) + document, source=source)  # padded: lines count in the file
        stages.append(Stage(recipe.name, document, recipe, set()))
    names = [stage.name for stage in stages if stage.name]
    if len(set(names)) != len(names):
        raise ConfigError("two stages have the same name", where=source, fix="give every stage its own `name:`")
    if len(stages) - len(names) > 1:
        raise ConfigError("more than one stage has no name", where=source,
                          fix="name every stage but the final one (the result)")
    for stage in stages:
        _rewrite(_data(stage.text, source), set(names) - {stage.name}, {}, stage.needs)
    ordered, done = [], set()
    while len(ordered) < len(stages):
        ready = [s for s in stages if s not in ordered and s.needs <= done]
        if not ready:
            cycle = ", ".join(s.name or "(result)" for s in stages if s not in ordered)
            raise ConfigError(f"the stages use each other in a circle: {cycle}", where=source)
        for stage in ready:
            ordered.append(stage)
            done.add(stage.name)
    used = set().union(*(s.needs for s in stages))
    results = [s for s in stages if s.name is None] or [s for s in stages if s.name not in used]
    if len(results) != 1:
        raise ConfigError(f"no single result among the stages ({', '.join(s.name or '?' for s in results)})",
                          where=source, fix="leave the final stage unnamed")
    ordered.remove(results[0])
    return ordered + results


def _reusable(folder: Path, recipe: Recipe) -> bool:
    from mtool.lineage import read_lineage

    record = read_lineage(folder) if folder.is_dir() else None
    return record is not None and record.recipe == recipe.canonical() and any(folder.glob("*.safetensors"))


def run_stages(stages: list[Stage], out: Path, options, *, intermediate_dir: Path | None = None,
               strict: bool = False, dry_run: bool = False, hasher=None) -> Path | None:
    """Run every stage (see the module docstring); returns OUT (None for a dry run)."""
    from mtool.merger.plan import build_plan
    from mtool.merger.run import execute

    out = Path(out)
    keep = intermediate_dir is not None
    if not dry_run and out.exists() and not options.force:
        raise OutputExistsError(f"{out} already exists", fix="pass --force to replace it")
    scratch = Path(intermediate_dir) if keep else Path(tempfile.mkdtemp(prefix=".mtool-stages-",
                                                                         dir=out.resolve().parent))
    names = {s.name for s in stages if s.name}
    folders = {name: (scratch / name).resolve() for name in names}
    records = []
    try:
        for index, stage in enumerate(stages):
            final = index == len(stages) - 1
            data = _rewrite(_data(stage.text), names - {stage.name}, folders, set())
            recipe = parse_recipe(yaml.safe_dump(data, sort_keys=False), source=f"stage {stage.name or '(result)'}")
            target = out if final else folders[stage.name]
            records.append({"name": stage.name, "recipe": recipe.canonical(),
                            "output": str(target) if (final or keep) else "temporary"})
            label = stage.name or "result"
            if dry_run:
                missing = [n for n in stage.needs if not folders[n].is_dir()]
                if missing:
                    ui.info(f"stage {label}: planned once {', '.join(sorted(missing))} exists")
                    continue
                from mtool.merger.describe import describe_plan

                ui.info(f"stage {label}:\n{describe_plan(build_plan(recipe, strict=strict))}")
                continue
            if not final and keep and _reusable(target, recipe):
                ui.info(f"stage {label}: {target} holds this stage's merge already; reused")
                continue
            ui.info(f"stage {index + 1} of {len(stages)}: {label}")
            stage_options = options if final else type(options)(**{**vars(options), "force": True,
                                                                    "write_card": keep and options.write_card})
            if final:
                stage_options.record_extras = {"stages": records}
                stage_options.parent_names = {str(folder): f"stage:{name}" for name, folder in folders.items()}
            execute(build_plan(recipe, strict=strict), target, stage_options, hasher=hasher)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return None if dry_run else out
