"""Merging models whose vocabularies differ: the output tokenizer and each model's embedding rows, as mergekit
0.1.5 builds them.

``tokenizer_source`` (or ``tokenizer: {source: ...}``, whose default is ``union``) chooses the output tokenizer:

* ``base``: the base model's tokenizer (the first model's when there is no base), without the tokens whose id
  is at or past the model's ``vocab_size``;
* ``union``: that tokenizer plus every other model's tokens it lacks (regular tokens first, in each model's id
  order, then added tokens with their settings);
* a model reference: that model's tokenizer.

``tokenizer.tokens`` names tokens to add and where their rows come from (a model's row for the token, zeros, or
another token's row: ``{kind: model_token, model, token_id | token}``); ``force`` replaces the row in every model,
else only models lacking the token get it. ``pad_to_multiple_of`` pads the vocabulary with rows set to the mean
of each model's rows.

Each model's embedding-shaped tensors (``embed_tokens``, ``lm_head``) are permuted to the output vocabulary
before the merge: output row ``i`` takes the model's row of the same token. A token a model lacks takes a default
row: the row of the one model that has it, else the base's (when the base is among the tensor's inputs), else the
mean over the models that have it, zeros when none has it. With ``mtool: {vocabulary_fill: base}`` it takes the
base's row for the token instead, else that model's mean row: a row no model learnt for that token never pulls
the merge towards another model's.

mergekit orders the models (and so a union's new regular tokens) by a hash that changes from run to run; mtool
uses the recipe's order, and each model's tokens in id order.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.errors import ConfigError, shown
from mtool.merger.recipe import ModelReference, ModelToken, TokenSource, ZeroToken

if TYPE_CHECKING:
    import torch

    from mtool.merger.plan import InputModel, MergePlan, TensorPlan


@dataclass
class VocabularyPlan:
    tokenizer: Any  # the output tokenizer (transformers), saved with the model
    vocabulary: dict[str, int]  # output token -> output id
    size: int  # output rows, padding included
    permutations: dict[ModelReference, dict[int, int]]  # per model: output id -> its row (-1: it lacks the token)
    original: dict[ModelReference, dict[str, int]]  # per model: its own token -> row
    tokens: dict[str, TokenSource] = field(default_factory=dict)  # the recipe's tokenizer.tokens
    added_tokens: list[str] = field(default_factory=list)  # tokens the output has beyond the source's vocabulary


def _vocab_size(model: "InputModel") -> int | None:
    from mtool.merger.layout import vocabulary_size

    return vocabulary_size(model.config)


def _load(model: "InputModel"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.checkpoint.folder)


def _stripped(model: "InputModel"):
    """The model's tokenizer without the tokens at or past its ``vocab_size`` (BPE tokenizers)."""
    tokenizer = _load(model)
    size = _vocab_size(model) or len(tokenizer.get_vocab())
    unused = {token for token, index in tokenizer.get_vocab().items() if index >= size}
    if not unused:
        return tokenizer
    import tokenizers

    data = json.loads(tokenizer._tokenizer.to_str())
    if not tokenizer.is_fast or data["model"]["type"] != "BPE":
        raise ConfigError("the tokenizer has tokens past the model's vocab_size and is not a BPE tokenizer",
                          where=str(model.reference), fix="merge with another tokenizer_source")
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < size]
    for token in unused:
        data["model"]["vocab"].pop(token, None)

    def kept(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(part in unused for part in parts)

    data["model"]["merges"] = [merge for merge in data["model"]["merges"] if kept(merge)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base_tokenizer, tokenizers: dict[ModelReference, Any], sizes: dict[ModelReference, int | None]):
    from transformers import AutoTokenizer

    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for reference, tokenizer in tokenizers.items():
        size = sizes.get(reference) or tokenizer.vocab_size
        decoder = tokenizer.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size and token not in added_contents:
                regular.setdefault(token, None)
        for index, info in decoder.items():
            if index < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:
        base_tokenizer.save_pretrained(folder)
        result = AutoTokenizer.from_pretrained(folder)
    known = base_tokenizer.get_vocab()
    for token in regular:
        if token not in added and token not in known:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def plan_vocabulary(plan: "MergePlan") -> VocabularyPlan:
    recipe = plan.recipe
    choice = recipe.tokenizer_choice
    references = list(plan.models)
    base_reference = plan.base_reference or references[0]
    base_tokenizer = _stripped(plan.models[base_reference])
    tokenizers = {base_reference: base_tokenizer}
    for reference in references:
        if reference != base_reference:
            tokenizers[reference] = _load(plan.models[reference])
    sizes = {reference: _vocab_size(model) for reference, model in plan.models.items()}
    if choice == "base":
        output = base_tokenizer
    elif choice == "union":
        output = _union(base_tokenizer, tokenizers, sizes)
    else:
        output = _load(plan.tokenizer_model)
    source_vocabulary = set(output.get_vocab())
    settings = recipe.tokenizer
    tokens = dict(settings.tokens or {}) if settings else {}
    for token in tokens:
        if token not in output.get_vocab():
            output.add_tokens(token)
    vocabulary = output.get_vocab()
    size = len(vocabulary)
    if settings and settings.pad_to_multiple_of:
        size = math.ceil(size / settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    permutations = {}
    for reference in references:
        own = tokenizers.get(reference, base_tokenizer).get_vocab()
        limit = sizes[reference] or len(own)
        permutations[reference] = {index: (own[token] if token in own and own[token] < limit else -1)
                                   for token, index in vocabulary.items()}
    original = {reference: tokenizer.get_vocab() for reference, tokenizer in tokenizers.items()}
    for token, token_source in tokens.items():
        source = token_source.source
        model = source.model if isinstance(source, ModelToken) else source
        if isinstance(model, ModelReference) and model not in plan.models:
            raise ConfigError(f"token {shown(token, 60)}: source {shown(str(model), 80)} is not one of the recipe's "
                              "models", where="tokenizer.tokens", fix="name a model the recipe merges")
    for tensor in plan.tensors:
        if tensor.vocabulary:
            tensor.shape = (size, *tensor.shape[1:])
    added = sorted((t for t in vocabulary if t not in source_vocabulary), key=vocabulary.get)
    return VocabularyPlan(tokenizer=output, vocabulary=vocabulary, size=size, permutations=permutations,
                          original=original, tokens=tokens, added_tokens=added)


def _default_sources(vocabulary: VocabularyPlan, models: list[ModelReference],
                     base: ModelReference | None) -> tuple[dict[str, TokenSource], set[str]]:
    """Where each token's default row comes from (mergekit's assignment), and the tokens averaged over models."""
    configs = dict(vocabulary.tokens)
    averaged = set()
    for token, index in vocabulary.vocabulary.items():
        if token in configs:
            continue
        present = [m for m in models if vocabulary.permutations[m][index] >= 0]
        if len(present) == 1:
            configs[token] = TokenSource(source=present[0])
        elif not present:
            configs[token] = TokenSource(source=ZeroToken(kind="zero"))
        elif base in models and vocabulary.permutations[base][index] >= 0:
            configs[token] = TokenSource(source=base)
        else:
            averaged.add(token)
    return configs, averaged


def align_rows(plan: "MergePlan", tensor: "TensorPlan", inputs: list["torch.Tensor"],
               base_rows: "list | None") -> list["torch.Tensor"]:
    """Each input's rows permuted to the output vocabulary (see the module docstring)."""
    import torch

    vocabulary = plan.vocabulary
    models = [s.model.reference for s in tensor.sources]
    tensors = dict(zip(models, inputs))
    dtype = inputs[0].dtype
    for value in inputs[1:]:
        dtype = torch.promote_types(dtype, value.dtype)
    row_shape = inputs[0].shape[1:]
    configs, averaged = _default_sources(vocabulary, models, plan.base_reference)
    ids = vocabulary.vocabulary
    forced = {ids[token] for token, config in vocabulary.tokens.items() if config.force and token in ids}
    defaults: dict[int, torch.Tensor] = {}
    for token, index in ids.items():
        if index not in forced and all(vocabulary.permutations[m][index] >= 0 for m in models):
            continue
        if token in averaged:
            row, count = torch.zeros(row_shape, dtype=dtype), 0
            for model in models:
                if vocabulary.permutations[model][index] >= 0:
                    row = row + tensors[model][vocabulary.permutations[model][index]]
                    count += 1
            defaults[index] = row / count
        elif token in configs:
            defaults[index] = _explicit_row(vocabulary, tensors, token, index, configs[token], dtype, row_shape)
    explicit = {ids[token] for token, config in vocabulary.tokens.items() if config.source is not None and token in ids}
    rows = len(ids)
    aligned = []
    for model in models:
        weight = tensors[model]
        permutation = torch.tensor([vocabulary.permutations[model][index] for index in range(rows)], dtype=torch.long)
        present = permutation >= 0
        if forced:
            present[sorted(forced)] = False
        out = torch.zeros((vocabulary.size, *row_shape), dtype=dtype)
        out[:rows][present] = weight[permutation[present]].to(dtype)
        for index in torch.nonzero(~present).reshape(-1).tolist():
            if base_rows is not None and index not in explicit:
                out[index] = base_rows[index] if base_rows[index] is not None else weight.mean(dim=0)
            elif index in defaults:
                out[index] = defaults[index]
        if vocabulary.size > rows:
            out[rows:] = torch.mean(out[:rows], dim=0)
        aligned.append(out)
    return aligned


def _explicit_row(vocabulary: VocabularyPlan, tensors: dict, token: str, index: int, config: TokenSource,
                  dtype, row_shape) -> "torch.Tensor":
    import torch

    source = config.source
    if isinstance(source, ZeroToken) or source is None:
        return torch.zeros(row_shape, dtype=dtype)
    model = source.model if isinstance(source, ModelToken) else source
    if model not in tensors:
        raise ConfigError(f"token {shown(token, 60)} takes its row from {shown(str(model), 80)}, which is not an "
                          "input of this tensor", where="tokenizer.tokens", fix="name a model this slice merges")
    if isinstance(source, ModelToken):
        row_index = source.token_id
        if row_index is None:
            if source.token not in vocabulary.original[model]:
                raise ConfigError(f"token {shown(source.token, 60)} is not in {shown(str(model), 80)}'s vocabulary",
                                  where="tokenizer.tokens", fix="choose a source model that has the token")
            row_index = vocabulary.original[model][source.token]
        if not 0 <= row_index < tensors[model].shape[0]:
            raise ConfigError(f"token id {row_index} is out of range for {shown(str(model), 80)}",
                              where="tokenizer.tokens", fix="give an id below the model's vocabulary size")
        return tensors[model][row_index]
    row = vocabulary.permutations[model][index]
    if row < 0:
        raise ConfigError(f"token {shown(token, 60)} is not in {shown(str(model), 80)}'s vocabulary",
                          where="tokenizer.tokens", fix="choose a source model that has the token")
    return tensors[model][row]


def base_rows_for(vocabulary: VocabularyPlan, base_weight: "torch.Tensor", base: ModelReference) -> list:
    """``vocabulary_fill: base``: the base's row for every output token, None where the base lacks it."""
    permutation = vocabulary.permutations[base]
    return [base_weight[permutation[index]] if permutation[index] >= 0 else None
            for index in range(len(vocabulary.vocabulary))]


def write_tokenizer(plan: "MergePlan", folder: Path) -> None:
    """The output tokenizer, as built for the merge."""
    tokenizer = plan.vocabulary.tokenizer
    if plan.chat_template is not None:
        tokenizer.chat_template = plan.chat_template
    tokenizer.save_pretrained(folder)
