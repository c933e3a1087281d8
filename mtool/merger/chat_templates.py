"""The ``chat_template`` recipe key: a built-in template by name, ``auto``, or a Jinja template itself."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from mtool.errors import ConfigError

if TYPE_CHECKING:
    from mtool.merger.plan import MergePlan

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


def model_chat_template(folder) -> str | None:
    """The chat template a model folder ships (chat_template.jinja or tokenizer_config.json), if any."""
    import json
    from pathlib import Path

    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def resolve_chat_template(value: str, plan: "MergePlan") -> str:
    """``auto``: the template most of the input models ship; a built-in name; else a Jinja template."""
    if value == "auto":
        templates = [t for m in plan.models.values() if (t := model_chat_template(m.checkpoint.folder))]
        if not templates:
            raise ConfigError("chat_template: auto, but none of the models ships a chat template",
                              where="chat_template", fix=f"name one of: {', '.join(BUILTIN_TEMPLATES)}")
        return Counter(templates).most_common(1)[0][0]
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"unknown chat template {value!r}", where="chat_template",
                      fix=f"use auto, one of {', '.join(BUILTIN_TEMPLATES)}, or a Jinja template")
