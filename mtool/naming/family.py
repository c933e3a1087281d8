"""The Family part: the lineage root's model family as its publisher spells it, release version included.

From a Hub id: ``meta-llama/Llama-3.1-8B-Instruct`` -> Llama-3.1 (8B, Instruct);
``mistralai/Mistral-7B-Instruct-v0.2`` -> Mistral-v0.2 (the publisher's release version moves into the
Family, since the name's own version is the artifact's); ``Qwen/Qwen2.5-7B`` -> Qwen2.5;
``google/gemma-2-9b-it`` -> gemma-2 (9B, it); ``meta-llama/Meta-Llama-3-8B`` -> Llama-3 (Meta's license
asks for names that begin with "Llama"). Community shorthands inside derived names (``L2``, ``L3.1``,
``llama3``) are read as the family they abbreviate.

Without a Hub id, :func:`family_from_config` reads config.json (``model_type`` and, for Llama and
Mistral, the vocabulary and RoPE settings that tell their releases apart).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mtool.naming.schema import camel_join, canonical_size, is_encoding, is_size_like

# words that name a base model's variant (the BaseVariant part) rather than a derivative
VARIANT_WORDS = frozenset({"instruct", "chat", "it", "base"})
# words in Hub ids that describe the file format, not the model
_FORMAT_WORDS = frozenset({"hf", "safetensors", "pytorch", "transformers"})
_RELEASE = re.compile(r"(?:[vV][0-9]+(?:\.[0-9]+)*)|(?:2[0-9][01][0-9])")  # v0.1, or a YYMM code (2407)
_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


@dataclass(frozen=True)
class _Pattern:
    """Consecutive lower-case tokens (regexes) that spell a family; ``spell`` builds the canonical name from
    the regex groups."""

    tokens: tuple[str, ...]
    spell: Callable[[list[str]], str]
    shorthand: bool = False


def _fixed(name: str) -> Callable[[list[str]], str]:
    return lambda groups: name


def _phi(groups: list[str]) -> str:
    version = groups[0]
    return f"phi-{version}" if version in ("1", "1.5", "2", "4") else f"Phi-{version}"


_PATTERNS: tuple[_Pattern, ...] = (
    _Pattern(("meta", "llama", _NUMBER), lambda g: f"Llama-{g[0]}"),
    _Pattern(("llama", _NUMBER), lambda g: f"Llama-{g[0]}"),
    _Pattern((r"llama" + _NUMBER,), lambda g: f"Llama-{g[0]}"),
    _Pattern((r"l([234](?:\.[0-9])?)",), lambda g: f"Llama-{g[0]}", shorthand=True),
    _Pattern(("codellama",), _fixed("CodeLlama")),
    _Pattern(("tinyllama",), _fixed("TinyLlama")),
    _Pattern(("mistral", "nemo"), _fixed("Mistral-Nemo")),
    _Pattern(("mistral", "small"), _fixed("Mistral-Small")),
    _Pattern(("mistral", "large"), _fixed("Mistral-Large")),
    _Pattern(("mistral",), _fixed("Mistral")),
    _Pattern(("mixtral",), _fixed("Mixtral")),
    _Pattern(("ministral",), _fixed("Ministral")),
    _Pattern(("codestral",), _fixed("Codestral")),
    _Pattern(("qwen", _NUMBER), lambda g: f"Qwen{g[0]}"),
    _Pattern((r"qwen" + _NUMBER,), lambda g: f"Qwen{g[0]}"),
    _Pattern(("qwen",), _fixed("Qwen")),
    _Pattern(("qwq",), _fixed("QwQ")),
    _Pattern(("gemma", r"([0-9]+)"), lambda g: f"gemma-{g[0]}"),
    _Pattern((r"gemma([0-9]+)",), lambda g: f"gemma-{g[0]}"),
    _Pattern(("gemma",), _fixed("gemma")),
    _Pattern(("codegemma",), _fixed("codegemma")),
    _Pattern(("phi", _NUMBER), _phi),
    _Pattern((r"phi" + _NUMBER,), _phi),
    _Pattern(("yi", _NUMBER), lambda g: f"Yi-{g[0]}"),
    _Pattern(("yi",), _fixed("Yi")),
    _Pattern(("solar",), _fixed("SOLAR")),
    _Pattern(("olmo", r"([0-9]+)"), lambda g: f"OLMo-{g[0]}"),
    _Pattern(("olmo",), _fixed("OLMo")),
    _Pattern(("falcon" + _NUMBER,), lambda g: f"Falcon{g[0]}"),
    _Pattern(("falcon",), _fixed("falcon")),
    _Pattern(("deepseek", r"(v[0-9]+(?:\.[0-9]+)?|r[0-9]+)"), lambda g: f"DeepSeek-{g[0].upper()}"),
    _Pattern(("deepseek",), _fixed("DeepSeek")),
    _Pattern(("granite", _NUMBER), lambda g: f"granite-{g[0]}"),
    _Pattern((r"smollm" + _NUMBER,), lambda g: f"SmolLM{g[0]}"),
    _Pattern(("smollm",), _fixed("SmolLM")),
)


@dataclass(frozen=True)
class FamilyMatch:
    """A known family found in a token list: its canonical spelling and where it was."""

    family: str
    start: int
    end: int  # exclusive
    shorthand: bool

    def spelled(self, tokens: list[str]) -> str:
        return "-".join(tokens[self.start:self.end])


def find_family(tokens: list[str]) -> FamilyMatch | None:
    """The first known family in ``tokens`` (longest spelling at the earliest position)."""
    lowered = [token.lower() for token in tokens]
    for start in range(len(tokens)):
        for pattern in _PATTERNS:
            width = len(pattern.tokens)
            if start + width > len(tokens):
                continue
            groups: list[str] = []
            for regex, token in zip(pattern.tokens, lowered[start:start + width]):
                match = re.fullmatch(regex, token)
                if match is None:
                    break
                groups.extend(match.groups())
            else:
                return FamilyMatch(pattern.spell(groups), start, start + width, pattern.shorthand)
    return None


def has_release(family: str) -> bool:
    """Whether a Family already carries a release (a number or a version): Llama-3.1, Qwen2.5, Mistral-v0.1."""
    return any(ch.isdigit() for ch in family)


@dataclass(frozen=True)
class BaseModelName:
    """What a base model's id says: Family, Size (as the id spells it) and BaseVariant."""

    family: str
    size: str | None = None
    variant: str | None = None
    derived: bool = False  # the id names a derivative whose family was found inside it (Hermes-2-Pro-Llama-3-8B)
    release_known: bool = True  # False when only config.json's model_type was known (no release version)


def split_model_id(model_id: str) -> list[str]:
    """The words of a Hub id's name part (``owner/`` removed; split on ``-``, ``_`` and spaces)."""
    name = model_id.rstrip("/").split("/")[-1]
    return [token for token in re.split(r"[-_\s]+", name) if token]


def family_from_model_id(model_id: str) -> BaseModelName:
    """The Family, Size and BaseVariant a Hub id (or a folder name) spells; see the module docstring."""
    tokens = [t for t in split_model_id(model_id) if t.lower() not in _FORMAT_WORDS]
    while tokens and is_encoding(tokens[-1]):
        tokens.pop()
    release: list[str] = []
    while len(tokens) > 1 and _RELEASE.fullmatch(tokens[-1]):
        release.insert(0, tokens.pop())
    size_at = next((i for i, token in enumerate(tokens) if i > 0 and is_size_like(token)), None)
    size = canonical_size(tokens[size_at]) if size_at is not None else None
    known = find_family(tokens)
    derived = False
    if known is not None and known.start == 0:
        family = known.family
        rest = tokens[known.end:]
    elif known is not None:
        family, rest, derived = known.family, [], True
    else:
        stop = size_at if size_at is not None else 1
        family = "-".join(tokens[:stop]) if tokens else model_id
        rest = tokens[stop:]
    rest = [t for t in rest if not is_size_like(t)]
    if release and not derived and (not has_release(family) or family in ("Mistral-Nemo",)):
        family = f"{family}-{'-'.join(release)}"
    variant = None
    if rest and not derived:
        variant = rest[0] if len(rest) == 1 else camel_join(rest)
    return BaseModelName(family=family, size=size, variant=variant, derived=derived)


@dataclass(frozen=True)
class ConfigFamily:
    family: str
    note: str  # how it was derived, for the card's gaps and lint's info
    release_known: bool = True

    def as_base(self) -> BaseModelName:
        return BaseModelName(self.family, release_known=self.release_known)


_MODEL_TYPES = {
    "llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral", "qwen2": "Qwen2", "qwen2_moe": "Qwen2-MoE",
    "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE", "gemma": "gemma", "gemma2": "gemma-2", "gemma3": "gemma-3",
    "gemma3_text": "gemma-3", "phi": "phi-2", "phi3": "Phi-3", "phimoe": "Phi-3.5-MoE", "olmo": "OLMo",
    "olmo2": "OLMo-2", "falcon": "falcon", "granite": "granite", "deepseek_v2": "DeepSeek-V2",
    "deepseek_v3": "DeepSeek-V3", "starcoder2": "starcoder2", "cohere": "c4ai-command-r", "gpt2": "gpt2",
}


def family_from_config(config: dict) -> ConfigFamily | None:
    """The Family a config.json implies, from ``model_type`` (and, for Llama and Mistral, the vocabulary and
    RoPE settings of their releases); None without ``model_type``."""
    model_type = str(config.get("model_type") or "").lower()
    if not model_type:
        return None
    vocab = config.get("vocab_size")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") if isinstance(rope, dict) else None
    if model_type == "llama":
        if vocab == 128256 and rope_type == "llama3":
            release = "3.2" if config.get("tie_word_embeddings") else "3.1"
            return ConfigFamily(f"Llama-{release}", f"Llama {release} vocabulary and RoPE scaling in config.json")
        if vocab == 128256:
            return ConfigFamily("Llama-3", "Llama 3 vocabulary in config.json")
        if vocab == 32000 and config.get("max_position_embeddings") == 4096:
            return ConfigFamily("Llama-2", "Llama 2 vocabulary and context length in config.json")
    if model_type == "mistral":
        if vocab == 32768:
            return ConfigFamily("Mistral-v0.3", "Mistral v0.3 vocabulary in config.json")
        if vocab == 32000 and config.get("sliding_window") == 4096:
            return ConfigFamily("Mistral-v0.1", "Mistral v0.1 sliding window in config.json")
        if vocab == 32000 and config.get("sliding_window") is None and config.get("rope_theta") == 1000000.0:
            return ConfigFamily("Mistral-v0.2", "Mistral v0.2 RoPE base in config.json")
    family = _MODEL_TYPES.get(model_type, model_type.replace("_", "-"))
    return ConfigFamily(family, f"model_type {model_type!r} in config.json (release version unknown)",
                        release_known=False)


def is_variant_word(token: str) -> bool:
    return token.lower() in VARIANT_WORDS
