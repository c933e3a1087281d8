"""Training examples as text with the character ranges the loss is computed on.

Every data format becomes a :class:`Rendered` example: the text the model reads, the spans of it that are
trained (the responses, or everything with ``train_on_prompt``), and whether an end-of-sequence token follows
so the model learns to stop. Formats (``data.format``, detected from the columns when ``auto``):

- ``chat``: ``messages`` (role/content) or ShareGPT ``conversations`` (from/value); trained on every
  assistant turn, with its end-of-turn markers, as the chat template renders them.
- ``alpaca``: ``instruction``, ``input``, ``output``, optional ``system``; trained on ``output``; rendered as a
  chat (system?, user = instruction + blank line + input, assistant = output).
- ``prompt_completion``: ``prompt``, ``completion`` (strings, or lists of messages); trained on ``completion``.
- ``text``: ``text``; trained on everything.

Assistant turns are located by rendering the conversation incrementally: the prompt of turn *i* is the
template applied to messages ``[:i]`` with the generation prompt, and the turn ends where the template applied
to ``[:i+1]`` ends; the text between is trained. This works with any template that renders a conversation's
prefix as a prefix of the whole (nearly all do); one that does not is reported with what to do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtool import chat_templates
from mtool.chat_templates import BUILTIN_TEMPLATES
from mtool.errors import ConfigError, InputError, kind_of, printable, shown
from mtool.train.records import RecordError

FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    # format -> alternative column sets that identify it (first match wins, in this order)
    "chat": (("messages",), ("conversations",)),
    "alpaca": (("instruction", "output"),),
    "prompt_completion": (("prompt", "completion"),),
    "text": (("text",),),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class TemplateRefusal(InputError):
    """The chat template raised an error for one conversation (reported with the record it came from)."""


class FieldProblem(ValueError):
    """A record's field that does not have the type of the data format (reported with the record)."""


@dataclass(frozen=True)
class Rendered:
    """One example as text; ``spans`` are the trained ``[start, end)`` character ranges, in order."""

    text: str
    spans: tuple[tuple[int, int], ...]
    append_eos: bool = True


def detect_format(columns: Sequence[str], where: str) -> str:
    """The data format a set of column names identifies (see the module table)."""
    present = set(columns)
    for name, alternatives in FORMAT_COLUMNS.items():
        if any(set(needed) <= present for needed in alternatives):
            return name
    raise InputError(f"cannot tell the data format from the columns {sorted(present)}", where=where,
                     fix="use messages (chat), instruction/input/output (alpaca), prompt/completion or text columns, "
                         "or set data.format")


def check_columns(data_format: str, columns: Sequence[str], where: str) -> None:
    """Refuse a forced format whose columns are missing."""
    present = set(columns)
    if not any(set(needed) <= present for needed in FORMAT_COLUMNS[data_format]):
        wanted = " or ".join("/".join(needed) for needed in FORMAT_COLUMNS[data_format])
        raise InputError(f"data.format is {data_format}, but the data has no {wanted} column "
                         f"(it has {sorted(present)})",
                         where=where, fix="set data.format to auto or rename the columns")


# ---------------------------------------------------------------------------------------------------
# Chat templates


def resolve_chat_template(value: str | None, tokenizer_template: str | None, data_format: str) -> str | None:
    """The Jinja template used to render conversations.

    ``value`` (``data.chat_template``): a built-in name, a path to a ``.jinja`` file, or Jinja text
    (:func:`mtool.chat_templates.resolve_chat_template`). Without one, the tokenizer's own template; a tokenizer
    without one gets the built-in ``alpaca`` template for alpaca data, and chat data is refused when it is
    rendered (no way to guess the format the model should learn).
    """
    if value:
        return chat_templates.resolve_chat_template(value, where="data.chat_template", files=True)
    if tokenizer_template:
        return tokenizer_template
    if data_format == "alpaca":
        return BUILTIN_TEMPLATES["alpaca"]
    return None  # chat and prompt/completion data: decided per example (only conversations need one)


def template_markers(template: str) -> list[str]:
    """The ``<|name|>`` markers a template writes literally (chatml's ``<|im_start|>``, llama3's ``<|eot_id|>``)."""
    return list(dict.fromkeys(_MARKER.findall(template)))


class ChatRenderer:
    """Renders conversations with one template and finds the assistant turns in the text."""

    def __init__(self, tokenizer: Any, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
        if self.template is None:
            raise InputError("the data holds conversations but the tokenizer has no chat template",
                             where="data.chat_template",
                             fix=f"name one: data.chat_template = {' | '.join(BUILTIN_TEMPLATES)}")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as error:
            raise TemplateRefusal(f"the chat template refused the conversation: {printable(str(error))[:200]}",
                                  where="data.chat_template",
                                  fix="check the roles and their order in the data, or choose another template") \
                from None

    def conversation(self, messages: list[dict[str, str]], *, train_on_prompt: bool) -> Rendered:
        """The whole conversation, trained on each assistant turn (or on everything)."""
        text = self.render(messages)
        spans: list[tuple[int, int]] = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1])
            if not (text.startswith(prompt) and text.startswith(through) and len(prompt) <= len(through)):
                raise InputError("the chat template does not render a conversation's beginning as the beginning "
                                 "of the whole, so the assistant turns cannot be located",
                                 where="data.chat_template",
                                 fix="choose another template (data.chat_template) or set data.train_on_prompt")
            spans.append((len(prompt), len(through)))
        if train_on_prompt:
            spans = [(0, len(text))]
        eos = self.tokenizer.eos_token or ""
        last = text[spans[-1][0]: spans[-1][1]] if spans else ""
        return Rendered(text, tuple(spans), append_eos=not (eos and eos in last))


# ---------------------------------------------------------------------------------------------------
# Records -> Rendered


def _text_field(record: Mapping[str, Any], key: str, problems: list[str]) -> str:
    """``record[key]`` as text: a string, or empty when absent or null; anything else is noted in ``problems``."""
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(f"the field {key!r} must be a string, got {kind_of(value)} ({shown(value, 40)})")
        return ""
    return value


def normalize_messages(raw: Any, field_name: str = "messages") -> list[dict[str, str]]:
    """``[{role, content}]`` from OpenAI-style messages or ShareGPT ``{from, value}`` turns; raises FieldProblem
    saying what is wrong (the caller adds where)."""
    if not isinstance(raw, list) or not raw:
        raise FieldProblem(f"the field {field_name!r} must be a non-empty list of messages, got {kind_of(raw)}")
    messages = []
    for number, turn in enumerate(raw, start=1):
        if not isinstance(turn, Mapping):
            raise FieldProblem(f"message {number} of {field_name!r} must be an object, got {kind_of(turn)}")
        if "role" in turn:
            role, content = turn["role"], turn.get("content")
        elif "from" in turn:
            role, content = turn["from"], turn.get("value")
            role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        else:
            raise FieldProblem(f"message {number} of {field_name!r} needs role/content (or from/value), got keys "
                             f"{shown(sorted(map(str, turn)), 60)}")
        if not isinstance(role, str) or not (content is None or isinstance(content, str)):
            raise FieldProblem(f"message {number} of {field_name!r} must have a string role and string content, got "
                             f"{kind_of(role)} and {kind_of(content)}")
        messages.append({"role": role, "content": content or ""})
    return messages


def alpaca_messages(record: Mapping[str, Any], problems: list[str] | None = None) -> list[dict[str, str]]:
    """system (optional), user = instruction [+ blank line + input], assistant = output."""
    problems = [] if problems is None else problems
    instruction, extra = _text_field(record, "instruction", problems), _text_field(record, "input", problems)
    output, system = _text_field(record, "output", problems), _text_field(record, "system", problems)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def render_record(record: Any, data_format: str, chat: ChatRenderer, *, train_on_prompt: bool, where: str,
                  index: int = 0) -> Rendered:
    """One raw record as a :class:`Rendered` example; a record whose fields do not have the format's types (text
    that is not a string, a message without a string role) raises :class:`RecordError` with its ``index``."""
    if not isinstance(record, Mapping):
        raise RecordError(f"a data record must be an object, got {kind_of(record)}", index=index, where=where)
    problems: list[str] = []
    try:
        rendered = _render(record, data_format, chat, train_on_prompt, problems)
    except FieldProblem as problem:
        problems.append(str(problem))
    except TemplateRefusal as refusal:
        problems.append(refusal.what)
    if problems:
        raise RecordError(f"{data_format} data: {problems[0]}", index=index, where=where)
    return rendered


def _render(record: Mapping[str, Any], data_format: str, chat: ChatRenderer, train_on_prompt: bool,
            problems: list[str]) -> Rendered:
    if data_format == "text":
        text = _text_field(record, "text", problems)
        return Rendered(text, ((0, len(text)),))
    if data_format == "alpaca":
        messages = alpaca_messages(record, problems)
        return Rendered("", ()) if problems else chat.conversation(messages, train_on_prompt=train_on_prompt)
    if data_format == "chat":
        key = "messages" if record.get("messages") is not None else "conversations"
        return chat.conversation(normalize_messages(record.get(key), key), train_on_prompt=train_on_prompt)
    if data_format == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt_messages = normalize_messages(prompt, "prompt") if prompt else []
            if isinstance(completion, list):
                completion_messages = normalize_messages(completion, "completion")
            else:
                completion_messages = [{"role": "assistant", "content": _text_field(record, "completion", problems)}]
            return chat.conversation(prompt_messages + completion_messages, train_on_prompt=train_on_prompt)
        prompt, completion = _text_field(record, "prompt", problems), _text_field(record, "completion", problems)
        text = prompt + completion
        start = 0 if train_on_prompt else len(prompt)
        return Rendered(text, ((start, len(text)),))
    raise ConfigError(f"unknown data format {shown(data_format, 40)}", where="data.format",
                      fix="use auto, alpaca, chat, prompt_completion or text")
