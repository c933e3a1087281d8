"""Evaluation data: local files read as training reads them (:mod:`mtool.train.data`), and the prompts, answers
and choices of exact-match and multiple-choice tasks.

Columns of a prompt task, one record per example:

- the prompt: ``prompt`` or ``question`` (text), or ``messages`` (a conversation whose last turn is the
  assistant's answer: the turns before it are the prompt);
- exact match: ``answer``, a string or a list of accepted strings;
- multiple choice: ``choices`` (a list of strings) and ``answer``, the index of the right one or its text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtool.errors import InputError
from mtool.io.hashing import FileHasher
from mtool.lineage import Dataset
from mtool.train.data import find_data, load_records
from mtool.train.formats import normalize_messages

if TYPE_CHECKING:
    import datasets

Prompt = str | list[dict[str, str]]  # plain text, or the chat turns before the answer


@dataclass(frozen=True)
class PromptExample:
    """One question: its prompt, the accepted answers (multiple choice: the right choice), the choices."""

    prompt: Prompt
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()

    @property
    def answer_index(self) -> int:
        """The position of the right choice (multiple choice)."""
        return self.choices.index(self.answers[0])


@dataclass
class EvalData:
    """The records of a task's data files and the lineage description of that data."""

    records: "datasets.Dataset"
    dataset: Dataset
    where: str


def read_data(paths: Sequence[str], *, hasher: FileHasher, limit: int | None = None, key: str = "data") -> EvalData:
    """The records of ``paths`` (the first ``limit``), with their id, sha256 and count for the lineage record."""
    source = find_data(list(paths), key=key)
    records = load_records(source, key=key)
    if limit is not None and limit < len(records):
        records = records.select(range(limit))
    where = ", ".join(str(path) for path in paths)
    if len(records) == 0:
        raise InputError("the data holds no example", where=where)
    dataset = Dataset(id=where, sha256=source.sha256(hasher), examples=len(records))
    return EvalData(records, dataset, where)


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{column} must be a string, got {type(value).__name__}", where=where)
    return value


def _prompt(record: Mapping[str, Any], where: str) -> tuple[Prompt, str | None]:
    """The prompt, and the answer when the record is a conversation ending in the assistant's turn."""
    conversation = record.get("messages") if record.get("messages") is not None else record.get("conversations")
    if conversation is not None:
        messages = normalize_messages(conversation, where)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise InputError("a conversation used as a question must end with the assistant's answer", where=where)
        return messages[:-1], messages[-1]["content"]
    for column in ("prompt", "question"):
        if record.get(column) is not None:
            return _text(record[column], column, where), None
    raise InputError(f"no prompt: the record has no prompt, question or messages (keys {sorted(record)})",
                     where=where)


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise InputError(f"answer must be a string or a list of strings, got {value!r}", where=where)


def exact_match_examples(data: EvalData) -> list[PromptExample]:
    """Prompts and accepted answers (``answer``, or the conversation's last turn)."""
    examples = []
    for index, record in enumerate(data.records):
        where = f"{data.where}, example {index + 1}"
        prompt, in_conversation = _prompt(record, where)
        value = record.get("answer") if record.get("answer") is not None else in_conversation
        if value is None:
            raise InputError("no answer: the record has no answer column", where=where)
        examples.append(PromptExample(prompt, _answers(value, where)))
    return examples


def multiple_choice_examples(data: EvalData) -> list[PromptExample]:
    """Prompts, choices and the right choice (``answer``: its index or its text)."""
    examples = []
    for index, record in enumerate(data.records):
        where = f"{data.where}, example {index + 1}"
        prompt, _ = _prompt(record, where)
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise InputError(f"choices must be a list of at least two strings, got {choices!r}", where=where)
        if len(set(choices)) != len(choices):
            raise InputError("the choices must be distinct", where=where)
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise InputError(f"answer must be the index of the right choice or its text, got {answer!r}", where=where)
        if isinstance(answer, int):
            if not 0 <= answer < len(choices):
                raise InputError(f"answer {answer} is not an index of the {len(choices)} choices", where=where)
            answer = choices[answer]
        elif answer not in choices:
            raise InputError(f"answer {answer!r} is not one of the choices", where=where)
        examples.append(PromptExample(prompt, (answer,), tuple(choices)))
    return examples
