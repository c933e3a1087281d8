"""What the adapter commands need to know about a base model folder: its tied embedding, and whether an
adapter fits it (from the safetensors headers alone)."""

from __future__ import annotations

from mtool.io.reading import Checkpoint
from mtool.lora.adapter import LoraAdapter

HEAD = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                      "tok_embeddings.weight")


def input_embedding_name(checkpoint: Checkpoint, config: dict) -> str | None:
    """The base's input embedding tensor (``model.embed_tokens.weight`` and its usual other spellings)."""
    vocab = config.get("vocab_size")
    for name in checkpoint.names:
        if name.endswith(EMBEDDING_SUFFIXES):
            shape = checkpoint.info(name).shape
            if len(shape) == 2 and (vocab is None or shape[0] == vocab):
                return name
    return None


def is_tied(checkpoint: Checkpoint, config: dict) -> bool:
    """A tied base stores no ``lm_head.weight`` and says ``tie_word_embeddings`` (transformers' default)."""
    return HEAD not in checkpoint and bool(config.get("tie_word_embeddings", True))


def tied_embedding(checkpoint: Checkpoint, config: dict) -> str | None:
    """The one matrix a tied base uses as input embedding and head, or None when the base is not tied."""
    return input_embedding_name(checkpoint, config) if is_tied(checkpoint, config) else None


def fit_problems(adapter: LoraAdapter, checkpoint: Checkpoint, config: dict) -> tuple[int, list[str]]:
    """``(tensors checked, problems)``: every tensor the adapter changes must exist in the base with the shape
    the adapter implies (the head of a tied base is its embedding)."""
    embedding = tied_embedding(checkpoint, config)
    problems = []
    changed = sorted(adapter.changed_tensors())
    for name in changed:
        source = embedding if name == HEAD and name not in checkpoint and embedding else name
        if source not in checkpoint:
            problems.append(f"{name} is not in the base")
            continue
        expected = adapter.expected_shape(name)
        actual = tuple(checkpoint.info(source).shape)
        if expected is not None and tuple(expected) != actual:
            problems.append(f"{name} is {list(actual)} in the base but {list(expected)} in the adapter")
    return len(changed), problems
