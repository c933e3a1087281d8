"""Chat templates by name: the built-in ones, a model folder's own, and the one resolver every command uses.

A user names a template as

* a built-in name: ``chatml``, ``llama3``, ``alpaca``, ``mistral``;
* ``auto`` (merges): the template most of the input models ship;
* Jinja text itself (anything with ``{{`` or ``{%``);
* a path to a ``.jinja`` file (training configs).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mtool.errors import ConfigError

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + "
        "'\n\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
        "eos_token }}{% endif %}{% endfor %}"
    ),
}


def is_jinja(text: str) -> bool:
    """Whether ``text`` is a Jinja template rather than a name."""
    return "{{" in text or "{%" in text


def model_chat_template(folder: str | Path) -> str | None:
    """The chat template a model folder ships (chat_template.jinja or tokenizer_config.json), if any."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def resolve_chat_template(value: str, *, where: str, auto_from: Sequence[Path] | None = None,
                          files: bool = False) -> str:
    """The Jinja text of the template ``value`` names (see the module docstring); ConfigError naming ``where``.

    ``auto`` is accepted when ``auto_from`` (the model folders to take it from) is given, a file path when
    ``files`` is true.
    """
    if auto_from is not None and value == "auto":
        templates = [t for folder in auto_from if (t := model_chat_template(folder))]
        if not templates:
            raise ConfigError(f"{where}: auto, but none of the models ships a chat template", where=where,
                              fix=f"name one of: {', '.join(BUILTIN_TEMPLATES)}")
        return Counter(templates).most_common(1)[0][0]
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if is_jinja(value):
        return value
    if files:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
    choices = ["auto"] if auto_from is not None else []
    choices += [", ".join(BUILTIN_TEMPLATES)] + (["a path to a .jinja file"] if files else []) + ["a Jinja template"]
    raise ConfigError(f"unknown chat template {value!r}", where=where,
                      fix=f"use {', '.join(choices[:-1])} or {choices[-1]}")
