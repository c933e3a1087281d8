"""What to evaluate: an evaluation spec (a YAML file, or built from ``mtool eval --data``) and its tasks.

Four kinds of task, each on local data:

- ``perplexity``: the mean token loss training minimizes, and its exponential, on text or conversations
  (every format ``mtool train`` reads; response tokens only for conversations, as training counts them).
- ``exact_match``: greedy answers to prompts, cut at a stop rule, compared with the reference answer(s).
- ``multiple_choice``: the choice the model gives the highest log-likelihood, compared with the right one.
- ``lm_eval``: a task of lm-evaluation-harness (its YAML, with local data files), run on the loaded model.

A search maximizes the weighted mean of each task's *score*: accuracy (or an lm-eval metric where higher is
better) as it is, a loss or a lower-is-better metric negated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mtool.errors import InputError

TaskKind = Literal["perplexity", "exact_match", "multiple_choice", "lm_eval"]
DataFormat = Literal["auto", "chat", "alpaca", "prompt_completion", "text"]
GUIDE = "see docs/eval.md for every key of an evaluation spec"


class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, ge=0)  # its share of a search's objective
    limit: int | None = Field(default=None, gt=0)  # evaluate the first N examples only


class _DataTask(_Task):
    data: list[str] = Field(min_length=1)  # .jsonl/.json/.parquet/.csv files, folders of them, or saved data sets

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class PerplexityTask(_DataTask):
    """Mean token loss and perplexity, computed as training computes its loss."""

    kind: Literal["perplexity"] = "perplexity"
    format: DataFormat = "auto"
    chat_template: str | None = None  # a built-in name, a .jinja file or Jinja text; default: the tokenizer's
    seq_len: int = Field(default=2048, gt=0)
    train_on_prompt: bool = False  # count every token, prompts included


class _PromptTask(_DataTask):
    chat: bool | None = None  # prompts as a user turn of the chat template; None: when the tokenizer has one
    system: str | None = None  # a system message before each chat prompt


class ExactMatchTask(_PromptTask):
    """Greedy answers compared with the reference (or any of several)."""

    kind: Literal["exact_match"] = "exact_match"
    max_new_tokens: int = Field(default=32, gt=0)
    stop: list[str] | None = None  # stop strings; default: none for chat prompts, a newline for plain ones
    ignore_case: bool = False


class MultipleChoiceTask(_PromptTask):
    """The choice of highest log-likelihood (``accuracy``), also per character (``accuracy_norm``)."""

    kind: Literal["multiple_choice"] = "multiple_choice"
    delimiter: str | None = None  # between the prompt and a choice; default: " " for plain prompts, "" for chat


class HarnessTask(_Task):
    """A task of lm-evaluation-harness: ``task`` is a task name or the path of a task YAML file."""

    kind: Literal["lm_eval"] = "lm_eval"
    task: str = Field(min_length=1)
    include: list[str] = Field(default_factory=list)  # folders (or files) of task YAMLs besides the harness's own
    metric: str | None = None  # the headline metric (default: the task's first)
    num_fewshot: int | None = Field(default=None, ge=0)


Task = Annotated[Union[PerplexityTask, ExactMatchTask, MultipleChoiceTask, HarnessTask], Field(discriminator="kind")]


class EvalSpec(BaseModel):
    """An evaluation: its tasks and how they run."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[Task] = Field(min_length=1)
    batch_size: int = Field(default=16, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    device: str = "auto"  # auto: the first CUDA GPU when there is one

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, tasks: list) -> list:
        names = [task.name for task in tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"task names must be distinct; repeated: {', '.join(repeated)}")
        if sum(task.weight for task in tasks) <= 0:
            raise ValueError("at least one task needs a weight above 0")
        return tasks

    def as_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=True)


def load_eval_spec(path: str | Path) -> EvalSpec:
    """An evaluation spec file (YAML); errors name the key and its line."""
    from mtool.yamlfiles import load_yaml_model

    return load_yaml_model(path, EvalSpec, what="evaluation spec", guide=GUIDE)


def detect_kind(columns: Sequence[str], where: str) -> TaskKind:
    """The task a data file's columns call for: ``choices`` -> multiple_choice; a prompt (or question) and an
    answer -> exact_match; anything training reads (text, messages, ...) -> perplexity."""
    present = set(columns)
    has_prompt = bool(present & {"prompt", "question"})
    if "choices" in present and has_prompt:
        return "multiple_choice"
    if has_prompt and "answer" in present:
        return "exact_match"
    if present & {"text", "messages", "conversations", "instruction", "completion"}:
        return "perplexity"
    raise InputError(f"cannot tell what to evaluate from the columns {sorted(present)}", where=where,
                     fix="use prompt/answer (exact_match), prompt/choices/answer (multiple_choice), or text or "
                         "messages (perplexity) columns, or pass --task")


def task_name_for(path: str, taken: set[str]) -> str:
    """A task name from a data file's name, made distinct from ``taken``."""
    stem = Path(path).name.split(".")[0] or "data"
    name, counter = stem, 2
    while name in taken:
        name, counter = f"{stem}-{counter}", counter + 1
    return name


def _file_tasks(paths: Sequence[str], kind: TaskKind | None, settings: dict, taken: set[str]) -> list[_Task]:
    """One task per data file (``mtool eval --data``): the task ``kind``, or the one the file's columns call for,
    with ``settings`` (the command's task options) where that kind of task has them."""
    from mtool.train.data import find_data, load_records

    tasks: list[_Task] = []
    for path in paths:
        if kind is None:
            columns = load_records(find_data([path], key="--data"), key="--data").column_names
            kind_here = detect_kind(columns, where=str(path))
        else:
            kind_here = kind
        task_type = {"perplexity": PerplexityTask, "exact_match": ExactMatchTask,
                     "multiple_choice": MultipleChoiceTask}[kind_here]
        name = task_name_for(path, taken)
        taken.add(name)
        fields = {key: value for key, value in settings.items() if key in task_type.model_fields and value is not None}
        tasks.append(task_type(name=name, data=[path], **fields))
    return tasks


def build_spec(*, spec_file: str | None, data: Sequence[str], kind: TaskKind | None, harness: Sequence[str],
               task_settings: dict, run_settings: dict) -> EvalSpec:
    """The evaluation ``mtool eval`` runs: the tasks of ``spec_file``, one per ``data`` file and one per
    ``harness`` task, with the command's settings (those given) over the spec's."""
    from mtool.errors import ConfigError

    if not (spec_file or data or harness):
        raise InputError("nothing to evaluate", fix="give --data FILE, --lm-eval TASK or --spec EVAL.yaml")
    base = load_eval_spec(spec_file) if spec_file else None
    tasks: list = list(base.tasks) if base else []
    taken = {task.name for task in tasks}
    try:
        tasks += _file_tasks(data, kind, task_settings, taken)
        for reference in harness:
            name = task_name_for(reference, taken)
            taken.add(name)
            tasks.append(HarnessTask(name=name, task=reference))
        limit = task_settings.get("limit")
        if limit is not None:
            tasks = [task.model_copy(update={"limit": limit}) for task in tasks]
        settings = base.model_dump(exclude={"tasks"}) if base else {}
        settings.update({key: value for key, value in run_settings.items() if value is not None})
        return EvalSpec(tasks=tasks, **settings)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        first = str(error).strip().splitlines()
        raise ConfigError(f"invalid evaluation settings: {' '.join(first[1:3]) if len(first) > 2 else first[0]}",
                          fix=GUIDE) from None
