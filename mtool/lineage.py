"""The provenance record every mtool output folder carries: ``mtool-lineage.json``.

A record says what operation made the folder (train / merge / adapter-merge / combine / extract /
resize / export), from which parents (each with its id, revision, role and the sha256 of every weight file
read), with which canonical recipe or training config, resolved parameters, seed and data set, and
what came out (file hashes, parameter count, final metrics), and later evaluations of it (``mtool eval``) and
the search that chose a merge's recipe. Names and cards are derived from it.

A parent that carries a record of its own has that record embedded (``Parent.lineage``), so the
whole tree travels with the output even when the parent folders are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtool import __version__
from mtool.errors import InputError
from mtool.hub import ModelRef
from mtool.io.hashing import FileHasher
from mtool.reproducible import creation_time

LINEAGE_FILENAME = "mtool-lineage.json"
SCHEMA_VERSION = 1

Operation = Literal["train", "merge", "adapter-merge", "combine", "extract", "resize", "export", "base"]
Role = Literal["base", "model", "adapter", "tokenizer"]


class Parent(BaseModel):
    """One input of an operation."""

    model_config = ConfigDict(extra="allow")

    id: str  # Hub id ("meta-llama/Llama-3.1-8B") or the local path as given
    role: Role
    is_hub: bool = False  # True when ``id`` is a Hub repository id (only those become card base_model ids)
    revision: str | None = None
    path: str | None = None  # resolved local folder the weights were read from
    files: dict[str, str] = Field(default_factory=dict)  # weight file name -> sha256
    license: str | None = None  # the parent's license as its card or config declares it
    weight: float | None = None  # the parent's weight in a merge, when it has one
    lineage: "Lineage | None" = None  # the parent's own record, when it has one


class Dataset(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str  # Hub id or local path as given
    sha256: str | None = None  # of the data files, in order
    is_hub: bool = False
    examples: int | None = None
    format: str | None = None


class Evaluation(BaseModel):
    """One task's result on the folder (``mtool eval``, or the search that chose it): the headline metric and
    every metric, the data (id, sha256, examples) and the settings it was measured with."""

    model_config = ConfigDict(extra="allow")

    task: str  # the task's name in the evaluation spec
    kind: str  # perplexity, exact_match, multiple_choice or lm_eval
    metric: str  # the headline metric: accuracy, perplexity, or an lm-eval task's metric
    value: float
    higher_is_better: bool = True
    metrics: dict[str, float] = Field(default_factory=dict)  # every metric of the task
    dataset: Dataset | None = None
    base: str | None = None  # the base model an adapter was evaluated on
    settings: dict[str, Any] = Field(default_factory=dict)  # batch size, dtype, device, generation settings
    tool_version: str = __version__
    created: str = Field(default_factory=creation_time)

    def key(self) -> tuple:
        """What makes two evaluations the same measurement (a newer one replaces an older one)."""
        data = (self.dataset.sha256, self.dataset.examples) if self.dataset else None
        return self.task, self.kind, self.metric, data, self.base


class SearchTrial(BaseModel):
    """One trial of a merge search: the values tried, the recipe they made, its score and its weights' sha256."""

    model_config = ConfigDict(extra="allow")

    number: int
    params: dict[str, Any]
    score: float
    scores: dict[str, float] = Field(default_factory=dict)  # task -> headline metric
    recipe: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)  # weight file name -> sha256


class SearchRecord(BaseModel):
    """How a searched merge was chosen: the optimizer, its seed, the space, the evaluation and every trial."""

    model_config = ConfigDict(extra="allow")

    optimizer: str
    seed: int
    objective: str  # what the score is, in words
    space: dict[str, Any]
    evaluation: dict[str, Any]
    trials: list[SearchTrial]
    best: int  # the number of the best trial (the output is its recipe)


class Lineage(BaseModel):
    """The record of one output folder (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    tool: str = "mtool"
    tool_version: str = __version__
    created: str = Field(default_factory=creation_time)  # SOURCE_DATE_EPOCH when set (mtool.reproducible)
    operation: Operation
    method: str | None = None  # merge method (slerp, ties...), combination type, or "lora"/"qlora"
    parents: list[Parent] = Field(default_factory=list)
    recipe: dict[str, Any] | None = None  # canonical merge recipe or training config
    parameters: dict[str, Any] = Field(default_factory=dict)  # resolved parameters
    seed: int | None = None
    dataset: Dataset | None = None
    outputs: dict[str, str] = Field(default_factory=dict)  # output weight file name -> sha256
    parameter_count: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    is_adapter: bool = False  # the output is a PEFT adapter, not a full model
    license: str | None = None  # declared by the output's publisher (mtool card --license); None: from the parents
    warnings: list[str] | None = None  # what the command warned about while making the output (e.g. SLERP t > 1)
    evaluations: list[Evaluation] | None = None  # results of `mtool eval` (and of the search that chose a merge)
    search: SearchRecord | None = None  # a searched merge: how its recipe was chosen

    def roots(self) -> list[Parent]:
        """The parents at the bottom of the tree: those that carry no record of their own."""
        found: list[Parent] = []
        for parent in self.parents:
            if parent.lineage is not None and parent.lineage.parents:
                found.extend(parent.lineage.roots())
            else:
                found.append(parent)
        return found

    def walk(self) -> Iterator[tuple[int, Parent]]:
        """Every parent in the tree with its depth (1 = direct parent), depth first."""
        for parent in self.parents:
            yield 1, parent
            if parent.lineage is not None:
                for depth, grandparent in parent.lineage.walk():
                    yield depth + 1, grandparent


Parent.model_rebuild()


def read_lineage(folder: str | os.PathLike) -> Lineage | None:
    """The record in ``folder``, or None when the folder has none. A malformed record is an error."""
    path = Path(folder) / LINEAGE_FILENAME
    if not path.is_file():
        return None
    try:
        return Lineage.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError) as error:
        first = str(error).splitlines()[0]
        raise InputError(f"malformed lineage record: {first}", where=str(path),
                         fix="regenerate the folder with mtool or delete the file") from None


def write_lineage(folder: str | os.PathLike, record: Lineage) -> Path:
    """Write ``record`` as ``folder/mtool-lineage.json`` (pretty, stable key order)."""
    path = Path(folder) / LINEAGE_FILENAME
    data = record.model_dump(mode="json", exclude_none=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file at ``path`` (the file now there: one replaced while waiting is
    opened again). Without ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    while True:
        descriptor = os.open(path, os.O_RDONLY)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            if os.fstat(descriptor).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        yield
    finally:
        os.close(descriptor)


def update_lineage(folder: str | os.PathLike, change: Callable[[Lineage], None]) -> Lineage | None:
    """Apply ``change`` to the record in ``folder`` and write it back (atomically, as :func:`write_lineage`
    does), holding a lock on the record meanwhile so that two processes adding to it keep both additions.
    None, and nothing written, when the folder has no record."""
    path = Path(folder) / LINEAGE_FILENAME
    if not path.is_file():
        return None
    with _locked(path):
        record = read_lineage(folder)
        assert record is not None
        change(record)
        write_lineage(folder, record)
    return record


@dataclass(frozen=True)
class ParentInput:
    """An input of an operation, to be described in its record: the model, its role, its weight if it has one."""

    ref: ModelRef
    role: Role
    weight: float | None = None


def describe_parent(reference: ModelRef | str | os.PathLike, role: Role, *, hasher: FileHasher,
                    weight: float | None = None) -> Parent:
    """A :class:`Parent` for an input folder: weight hashes, license, and its own record if any."""
    from mtool.io.reading import open_checkpoint

    if not isinstance(reference, ModelRef):
        reference = ModelRef(id=str(reference), path=Path(reference))
    folder = reference.path if reference.path.is_dir() else reference.path.parent
    try:
        files = hasher.hash_files(open_checkpoint(reference.path).weight_files)
    except InputError:
        files = {}
    record = read_lineage(folder)
    # An mtool output's card states a license derived from its own parents: only an explicit declaration counts;
    # otherwise its license is resolved from its record, so a later fix of an ancestor's license reaches it.
    declared = record.license if record is not None and record.parents else declared_license(folder)
    return Parent(
        id=reference.id,
        role=role,
        is_hub=reference.is_hub,
        revision=reference.revision,
        path=str(folder.resolve()),
        files=files,
        license=declared,
        weight=weight,
        lineage=record,
    )


def describe_parents_in_background(inputs: Sequence[ParentInput], hasher: FileHasher) -> "Future[list[Parent]]":
    """Describe ``inputs`` (hashing their weight files) in a thread of its own, so that the hashing overlaps the
    work that produces the output; the future's result is the parents in order, or the first error."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtool-parents")
    try:
        return pool.submit(lambda: [describe_parent(item.ref, item.role, hasher=hasher, weight=item.weight)
                                    for item in inputs])
    finally:
        pool.shutdown(wait=False)


def declared_license(folder: str | os.PathLike) -> str | None:
    """The license a model folder declares: its README front matter ``license:``, else config.json."""
    from mtool.io.folders import card_metadata

    folder = Path(folder)
    license = card_metadata(folder / "README.md").get("license")
    if isinstance(license, str) and license:
        return license[:200]
    config = folder / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("license")
        except (OSError, ValueError, AttributeError, RecursionError):
            value = None
        if isinstance(value, str) and value:
            return value[:200]
    return None


