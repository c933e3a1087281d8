"""How a checkpoint's tensor names map onto what a merge recipe talks about: modules, layers, and the tensors
before and after them.

A *module* is a stack of numbered layers: the tensors ``<prefix>.<i>.<rest>`` with a prefix ending in
``layers``, ``h``, ``blocks`` or ``layer`` (``model.layers``, ``transformer.h``, ``model.visual.blocks``). A
decoder has one; a vision-language model has its language tower and its vision tower. Every other tensor is
*loose*: it belongs to the module whose root (the prefix without its last part: ``model.``, ``model.visual.``)
starts its name, the longest such root, else to the language module (``lm_head.weight``); it sits before the
layers when it is an embedding, after them otherwise (final norm, ``lm_head``).

Recipes name modules as mergekit does: ``default`` when there is one, else the layer prefix itself (mergekit's
names for architectures it infers), and ``text_decoder`` / ``vision_tower`` for the language and the vision
module (mergekit's names for its known vision-language architectures).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE_LAYER_HINTS = ("embed", "wte", "wpe", "word_embeddings")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
_VOCABULARY_HINTS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
LM_HEAD = "lm_head.weight"


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``("model.layers", 3, "mlp.up_proj.weight")`` for a layer tensor, None otherwise."""
    match = _LAYER_NAME.match(name)
    if not match:
        return None
    return match.group("prefix"), int(match.group("index")), match.group("rest")


def layer_counts(names: Iterable[str]) -> dict[str, int]:
    """Every module's layer prefix and its number of layers (highest index + 1), in order of first appearance."""
    counts: dict[str, int] = {}
    for name in names:
        parts = split_layer_name(name)
        if parts:
            counts[parts[0]] = max(counts.get(parts[0], 0), parts[1] + 1)
    return counts


def root_of(prefix: str) -> str:
    """Where a module's loose tensors live: ``"model.visual."`` for ``"model.visual.blocks"``, ``"model."`` for
    ``"model.layers"``, ``"model.vision_tower."`` for ``"model.vision_tower.vision_model.encoder.layers"`` (up to
    the part that names the tower); ``""`` for ``"layers"``."""
    parts = prefix.split(".")
    for index, part in enumerate(parts[:-1]):
        if _is_vision(part):
            return ".".join(parts[:index + 1]) + "."
    return prefix.rpartition(".")[0] + "." if "." in prefix else ""


def language_module(prefixes: list[str], counts: dict[str, int]) -> str:
    """The prefix of the language tower: ``model.layers``-like or under a ``language_model``, else the module
    with the most layers."""
    for prefix in prefixes:
        if "language_model" in prefix or prefix in ("model.layers", "transformer.h", "gpt_neox.layers", "layers"):
            return prefix
    visionless = [p for p in prefixes if not _is_vision(p)] or prefixes
    return max(visionless, key=lambda p: counts.get(p, 0))


def _is_vision(prefix: str) -> bool:
    return any(word in prefix for word in ("vision", "visual", "image", "audio"))


def module_names(prefixes: list[str], language: str) -> dict[str, str]:
    """The names a recipe's ``modules:`` may use for each module prefix (name -> prefix)."""
    names = {prefix: prefix for prefix in prefixes}
    if len(prefixes) == 1:
        names["default"] = prefixes[0]
        return names
    names["text_decoder"] = language
    vision = [p for p in prefixes if _is_vision(p)]
    if len(vision) == 1:
        names["vision_tower"] = vision[0]
    return names


def owner(name: str, prefixes: list[str], language: str) -> str:
    """The module prefix a loose tensor belongs to (see the module docstring)."""
    roots = sorted(((root_of(p), p) for p in prefixes), key=lambda item: len(item[0]), reverse=True)
    for root, prefix in roots:
        if root and name.startswith(root):
            return prefix
    return language


def before_layers(name: str) -> bool:
    """Whether a loose tensor comes before the layers (an embedding) rather than after them."""
    return any(hint in name for hint in _PRE_LAYER_HINTS)


def input_embedding(names: Iterable[str]) -> str | None:
    """The input embedding a tied ``lm_head`` shares its weight with, if the checkpoint has one."""
    loose = [n for n in names if split_layer_name(n) is None]
    return next((n for n in loose if n.endswith(_INPUT_EMBEDDINGS)), None)


def vocabulary_size(config: dict) -> int | None:
    """The vocabulary size a config declares (the text config's in a vision-language config)."""
    for source in (config, config.get("text_config") or {}):
        if isinstance(source, dict) and isinstance(source.get("vocab_size"), int):
            return source["vocab_size"]
    return None


def is_vocabulary_tensor(name: str, shape: tuple[int, ...], vocabulary: int | None) -> bool:
    """Whether a loose tensor's rows follow the tokenizer: an input embedding or an output head."""
    return (len(shape) == 2 and any(hint in name for hint in _VOCABULARY_HINTS)
            and (vocabulary is None or shape[0] == vocabulary))
