"""Ollama Modelfiles from a model's chat template.

A Hugging Face chat template is Jinja; Ollama's ``TEMPLATE`` is a Go template. The usual templates wrap each
message in a prefix and a suffix that depend only on its role (ChatML, Llama 3, Gemma, Phi, mtool's own), so
:func:`chat_segments` finds them by rendering the Jinja template (as transformers does: sandboxed, ``trim_blocks``,
``lstrip_blocks``) on one message of each role, and keeps them only if they reproduce the template's rendering of
a whole conversation. :func:`ollama_template` writes them as a Go template over ``.Messages``; the assistant's suffix
(and the end-of-sequence token) become ``stop`` parameters. Templates with logic beyond that (tools, multi-part
content, role checks that change text) give None: Ollama then uses the template llama.cpp stored in the GGUF when it
recognizes it, and the card says so.

BOS is left to the runtime (llama.cpp and Ollama add it when the GGUF says so), so the template is rendered with
an empty ``bos_token``.
"""

from __future__ import annotations

from dataclasses import dataclass

MODELFILE = "Modelfile"  # the file name ``ollama create NAME -f Modelfile`` reads
_SENTINEL = {"system": "MTOOLSYSTEMTEXT", "user": "MTOOLUSERTEXT", "assistant": "MTOOLASSISTANTTEXT"}
_CHECK = [("system", "You are brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "2+2?"),
          ("assistant", "4")]


@dataclass(frozen=True)
class ChatSegments:
    """Each role's text around a message's content, and the text that starts the assistant's reply."""

    around: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    generation_prompt: str

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        text = "".join(self.around[role][0] + content + self.around[role][1] for role, content in messages)
        return text + (self.generation_prompt if add_generation_prompt else "")


def _render(template: str, messages: list[tuple[str, str]], add_generation_prompt: bool, eos: str) -> str:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(
        messages=[{"role": role, "content": content} for role, content in messages],
        add_generation_prompt=add_generation_prompt, bos_token="", eos_token=eos)


def chat_segments(template: str, eos_token: str = "") -> ChatSegments | None:
    """The role prefixes and suffixes of ``template`` (module docstring), or None when it is not of that kind."""
    try:
        around: dict[str, tuple[str, str]] = {}
        for role, sentinel in _SENTINEL.items():
            before = _render(template, [("user", _SENTINEL["user"])], False, eos_token) if role == "assistant" else ""
            messages = [("user", _SENTINEL["user"]), (role, sentinel)] if role == "assistant" else [(role, sentinel)]
            text = _render(template, messages, False, eos_token)
            if not text.startswith(before) or text[len(before):].count(sentinel) != 1:
                continue
            prefix, suffix = text[len(before):].split(sentinel)
            around[role] = (prefix, suffix)
        if "user" not in around or "assistant" not in around:
            return None
        single = _render(template, [("user", _SENTINEL["user"])], False, eos_token)
        prompted = _render(template, [("user", _SENTINEL["user"])], True, eos_token)
        if not prompted.startswith(single):
            return None
        segments = ChatSegments(around, prompted[len(single):])
        conversation = [(role, content) for role, content in _CHECK if role in around]
        for prompt in (False, True):
            if segments.render(conversation, prompt) != _render(template, conversation, prompt, eos_token):
                return None
        return segments
    except Exception:  # noqa: BLE001 - a template that does not render this way is simply not of this kind
        return None


def _go_literal(text: str) -> str | None:
    return None if "{{" in text or "}}" in text or '"""' in text else text


def ollama_template(segments: ChatSegments) -> str | None:
    """The Go template Ollama renders the same text with, or None when a segment cannot be written literally."""
    branches = []
    for role in ("system", "user", "assistant"):
        if role not in segments.around:
            continue
        prefix, suffix = (_go_literal(part) for part in segments.around[role])
        if prefix is None or suffix is None:
            return None
        keyword = "if" if not branches else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}')
    prompt = _go_literal(segments.generation_prompt)
    if prompt is None:
        return None
    return "{{- range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + prompt


def stop_sequences(segments: ChatSegments, eos_token: str = "") -> list[str]:
    """What ends the assistant's turn: its suffix (without trailing whitespace) and the end-of-sequence token."""
    stops = [segments.around["assistant"][1].strip(), eos_token]
    return [stop for stop in dict.fromkeys(stops) if stop]


def modelfile(gguf_file: str, template: str | None, eos_token: str = "") -> str:
    """An Ollama Modelfile for ``gguf_file`` (a path relative to the Modelfile): FROM, TEMPLATE and stop
    parameters when the chat template converts; FROM alone otherwise."""
    lines = [f"FROM ./{gguf_file}"]
    segments = chat_segments(template, eos_token) if template else None
    go_template = ollama_template(segments) if segments is not None else None
    if segments is not None and go_template is not None:
        lines.append(f'TEMPLATE """{go_template}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in stop_sequences(segments, eos_token)
                  if '"' not in stop and "\n" not in stop]
    return "\n".join(lines) + "\n"
