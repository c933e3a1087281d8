"""Merging models whose vocabularies differ: the output vocabulary and each model's embedding rows.

``tokenizer_source`` (or ``tokenizer: {source: ...}``) chooses the output vocabulary:

* ``base``: the base model's tokenizer (the first model's when there is no base);
* ``union``: the base's tokens, then every other model's tokens the base lacks, in model order;
* a model reference: that model's tokenizer.

Each model's embedding-shaped tensors (``embed_tokens``, ``lm_head``) are permuted to the output vocabulary
before the merge: output row ``i`` takes the model's row of the same token string. A token a model lacks
takes the base model's row for it when the base has one, else the mean of that model's rows, so it neither
pulls the merge towards zero nor invents a direction. ``tokenizer.tokens`` can pin a token's row to one
model's row (``source: MODEL``) or to zeros (``source: {kind: zero}``); ``pad_to_multiple_of`` pads the
vocabulary with zero rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.errors import ConfigError, shown
from mtool.merger.recipe import ModelReference

if TYPE_CHECKING:
    import torch

    from mtool.merger.plan import InputModel, MergePlan, TensorPlan


@dataclass
class VocabularyPlan:
    tokens: list[str]  # output id -> token string (padding rows excluded)
    size: int  # output rows, padding included
    rows: dict[ModelReference, "torch.Tensor"]  # per model: output id -> input row, -1 where missing
    pinned: dict[int, ModelReference | None] = field(default_factory=dict)  # output id -> model (None = zeros)
    added_tokens: list[str] = field(default_factory=list)  # tokens the tokenizer source lacks (union)


def _vocabulary(model: "InputModel") -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.checkpoint.folder)
    return tokenizer.get_vocab()


def plan_vocabulary(plan: "MergePlan") -> VocabularyPlan:
    import torch

    recipe = plan.recipe
    choice = recipe.tokenizer_choice
    vocabularies = {reference: _vocabulary(model) for reference, model in plan.models.items()}
    source = plan.tokenizer_model.reference
    ordered = sorted(vocabularies[source].items(), key=lambda item: item[1])
    tokens = [token for token, _ in ordered]
    added: list[str] = []
    if choice == "union":
        known = set(tokens)
        for reference, vocabulary in vocabularies.items():
            for token, _ in sorted(vocabulary.items(), key=lambda item: item[1]):
                if token not in known:
                    known.add(token)
                    tokens.append(token)
                    added.append(token)
    settings = recipe.tokenizer
    size = len(tokens)
    if settings and settings.pad_to_multiple_of:
        size = math.ceil(size / settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    rows = {}
    for reference, vocabulary in vocabularies.items():
        embedding_rows = plan.models[reference].config.get("vocab_size") or len(vocabulary)
        index = torch.full((len(tokens),), -1, dtype=torch.long)
        for out_id, token in enumerate(tokens):
            row = vocabulary.get(token)
            if row is not None and row < embedding_rows:
                index[out_id] = row
        rows[reference] = index
    pinned: dict[int, ModelReference | None] = {}
    position = {token: i for i, token in enumerate(tokens)}
    for token, token_source in ((settings.tokens or {}).items() if settings else ()):
        if token not in position:
            raise ConfigError(f"token {shown(token, 60)} is not in the output vocabulary", where="tokenizer.tokens",
                              fix="list tokens of the models' vocabularies")
        value = token_source.source
        if isinstance(value, dict) and value.get("kind") == "zero":
            pinned[position[token]] = None
        elif isinstance(value, str):
            reference = ModelReference.parse(value)
            if reference not in plan.models:
                raise ConfigError(f"token {shown(token, 60)}: source {shown(value, 80)} is not one of the recipe's "
                                  "models", where="tokenizer.tokens", fix="name a model the recipe merges")
            if rows[reference][position[token]] < 0:
                raise ConfigError(f"token {shown(token, 60)} is not in {shown(value, 80)}'s vocabulary",
                                  where="tokenizer.tokens", fix="choose a source model that has the token")
            pinned[position[token]] = reference
    for tensor in plan.tensors:
        if tensor.vocabulary:
            tensor.shape = (size, *tensor.shape[1:])
    return VocabularyPlan(tokens=tokens, size=size, rows=rows, pinned=pinned, added_tokens=added)


def align_rows(vocabulary: VocabularyPlan, tensor: "TensorPlan", inputs: list["torch.Tensor"],
               base_rows: "torch.Tensor | None") -> list["torch.Tensor"]:
    """Permute each input's rows to the output vocabulary (see the module docstring)."""
    import torch

    aligned = []
    for source, weight in zip(tensor.sources, inputs):
        index = vocabulary.rows[source.model.reference]
        present = index >= 0
        out = torch.empty((vocabulary.size, *weight.shape[1:]), dtype=weight.dtype)
        out[:len(index)][present] = weight[index[present]]
        missing = ~present
        if missing.any():
            if base_rows is not None:
                out[:len(index)][missing] = base_rows[missing]
            else:
                out[:len(index)][missing] = weight.mean(dim=0)
        out[len(index):] = 0
        aligned.append(out)
    return aligned


def base_rows_for(vocabulary: VocabularyPlan, base_weight: "torch.Tensor", base: ModelReference) -> "torch.Tensor":
    """The base's row for every output token (the mean row where the base lacks the token)."""
    index = vocabulary.rows[base]
    rows = base_weight.mean(dim=0).expand(len(index), *base_weight.shape[1:]).clone()
    present = index >= 0
    rows[present] = base_weight[index[present]]
    return rows


def apply_pins(vocabulary: VocabularyPlan, tensor: "TensorPlan", merged: "torch.Tensor",
               aligned: dict[ModelReference, "torch.Tensor"]) -> "torch.Tensor":
    for out_id, reference in vocabulary.pinned.items():
        merged[out_id] = 0 if reference is None else aligned[reference][out_id].to(merged.dtype)
    return merged


def write_tokenizer(plan: "MergePlan", folder: Path) -> None:
    """The output tokenizer: the source's, with the union's extra tokens added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_model.checkpoint.folder)
    if plan.vocabulary is not None and plan.vocabulary.added_tokens:
        tokenizer.add_tokens(plan.vocabulary.added_tokens)
    tokenizer.save_pretrained(folder)
