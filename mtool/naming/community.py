"""Reading community names (``MythoMax-L2-Kimiko-v2-13B-slerp-DARE-v0.3-GGUF``) into a schema name.

A best-effort rewrite from the words alone, for ``mtool name lint``'s fix line: the known family
(``L2`` -> Llama-2) goes first, the first size after it, a base-variant word (Instruct, it, Chat) next, the
remaining words become the Label in CamelCase (a version inside them joins the word before: KimikoV2), the
last Method found names the operation, the final version is kept (v1.0 when absent), ``-LoRA`` and the
encoding go last. No rewrite is offered without a Family, a Size, a Label and a Method: only the lineage
record can tell those (``mtool name suggest MODEL_DIR``).
"""

from __future__ import annotations

import unicodedata

from mtool.naming.check import check_name
from mtool.naming.family import find_family, has_release, is_variant_word
from mtool.naming.methods import find_method
from mtool.naming.schema import (
    ModelName,
    camel_join,
    canonical_encoding,
    canonical_size,
    canonical_version,
    decompose,
    is_encoding,
    is_lora_marker,
    is_size_like,
    is_version_like,
)

_NOISE = {"hf", "merge", "merged", "model", "final", "test"}


def _final_version_at(tokens: list[str]) -> int | None:
    """The index of the artifact's version: the last token before ``LoRA`` and the encoding part."""
    end = len(tokens)
    while end > 0 and (is_encoding(tokens[end - 1]) or is_lora_marker(tokens[end - 1])):
        end -= 1
    return end - 1 if end > 0 and is_version_like(tokens[end - 1]) else None


def _methods(tokens: list[str]) -> list:
    """The Methods named in ``tokens``, in order; two-word spellings (DARE-TIES) count once."""
    found, index = [], 0
    while index < len(tokens):
        pair = "-".join(tokens[index:index + 2]) if index + 1 < len(tokens) else ""
        if pair and find_method(pair) is not None:
            found.append(find_method(pair))
            index += 2
            continue
        if find_method(tokens[index]) is not None:
            found.append(find_method(tokens[index]))
        index += 1
    return found


def rewrite(text: str) -> ModelName | None:
    """The schema name a community name most likely means, or None when a part cannot be read from it."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    tokens = decompose(ascii_text).tokens
    version_at = _final_version_at(tokens)
    version = canonical_version(tokens[version_at]) if version_at is not None else None
    if version_at is not None:
        tokens = tokens[:version_at] + tokens[version_at + 1:]
    known = find_family(tokens)
    if known is None:
        return None
    family = known.family
    rest = tokens[:known.start] + tokens[known.end:]
    size = next((canonical_size(t) for t in rest if is_size_like(t)), None)
    encoding = [canonical_encoding(t) for t in rest if is_encoding(t)]
    lora = any(is_lora_marker(t) for t in rest)
    methods = _methods(rest)
    words = [t for t in rest if not (is_size_like(t) or is_encoding(t) or is_lora_marker(t) or find_method(t))]
    if not has_release(family) and words and known.start == 0 and is_version_like(words[0]):
        family = f"{family}-{canonical_version(words.pop(0))}"  # Mistral-7B-v0.1-...: the base's release
    variant = None
    label_words: list[str] = []
    for word in words:
        if variant is None and not label_words and is_variant_word(word):
            variant = word
        elif is_version_like(word):
            if label_words:  # a version inside the words belongs to the word before it: Kimiko-v2 -> KimikoV2
                label_words[-1] += "V" + word.lstrip("vV")
        elif word.lower() not in _NOISE:
            label_words.append(word)
    label = camel_join(label_words)
    if not (size and methods and label):
        return None
    name = ModelName(family=family, size=size, base_variant=variant, label=label, method=methods[-1].name,
                     version=version or "v1.0", lora=lora, encoding="-".join(encoding) or None)
    return name if check_name(name.format()).model_name() == name else None
