"""Ollama Modelfiles from chat templates: the role segments found reproduce what transformers renders."""

from __future__ import annotations

import pytest

from mtool.chat_templates import BUILTIN_TEMPLATES
from mtool.modelfile import chat_segments, modelfile, ollama_template, stop_sequences
from mtool.tinymodels import CHAT_TEMPLATE, build_tokenizer

TEMPLATES = {"mtool tiny": CHAT_TEMPLATE, **BUILTIN_TEMPLATES}
CONVERSATION = [("system", "Answer in one word."), ("user", "Capital of Peru?"), ("assistant", "Lima"),
                ("user", "And of Chile?"), ("assistant", "Santiago"), ("user", "Thanks!")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("name", TEMPLATES)
def test_segments_render_what_transformers_renders(tokenizer, name: str) -> None:
    template = TEMPLATES[name]
    segments = chat_segments(template, tokenizer.eos_token)
    assert segments is not None
    messages = [(role, content) for role, content in CONVERSATION if role in segments.around]
    tokenizer.chat_template = template
    for prompt in (False, True):
        expected = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                                 add_generation_prompt=prompt)
        expected = expected.removeprefix(tokenizer.bos_token) if "bos_token" in template else expected
        assert segments.render(messages, prompt) == expected


def test_chatml_becomes_ollamas_chatml_template() -> None:
    segments = chat_segments(BUILTIN_TEMPLATES["chatml"])
    assert ollama_template(segments) == (
        '{{- range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{ end }}<|im_start|>assistant\n")
    assert stop_sequences(segments, "<|endoftext|>") == ["<|im_end|>", "<|endoftext|>"]


def test_mistral_without_a_system_role_has_no_system_branch() -> None:
    segments = chat_segments(BUILTIN_TEMPLATES["mistral"], "</s>")
    assert set(segments.around) == {"user", "assistant"}
    assert modelfile("m.gguf", BUILTIN_TEMPLATES["mistral"], "</s>").splitlines()[-1] == 'PARAMETER stop "</s>"'


@pytest.mark.parametrize("template", [
    # the first message is rendered differently from the others: no fixed prefix per role
    "{% for m in messages %}{% if loop.first %}FIRST {% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
    # Go template delimiters in the literal text cannot be written in Ollama's template
    "{% for m in messages %}{{ '{{' + m['role'] + '}}' + m['content'] }}{% endfor %}",
    "{{ raise_exception('no chat') }}",
])
def test_templates_that_do_not_convert_give_a_modelfile_without_template(template: str) -> None:
    segments = chat_segments(template)
    assert segments is None or ollama_template(segments) is None
    assert modelfile("m.gguf", template) == "FROM ./m.gguf\n"
