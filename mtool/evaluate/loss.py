"""Mean token loss and perplexity: the loss training minimizes, on data rendered and masked as training does.

The records are rendered, tokenized and labelled by :mod:`mtool.train.data` (the same code ``mtool train``
runs: response tokens only for conversations, the end-of-sequence token appended and trained, sequences cut
at ``seq_len``, examples without a trained token dropped), batched by :mod:`mtool.train.batching` (right
padding, labels -100 on padding), and each batch's summed token cross-entropy comes from the model's own loss
(``num_items_in_batch=1``). Over all examples::

    mean_token_loss = sum over trained positions of -log p(token | the tokens before it) / trained positions
    perplexity      = exp(mean_token_loss)

which is the evaluation loss ``mtool train`` reports for the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mtool.errors import InputError
from mtool.evaluate.examples import EvalData
from mtool.evaluate.spec import PerplexityTask
from mtool.train.batching import group_micro_batches, load_micro_batches
from mtool.train.data import data_fingerprint, tokenize_dataset
from mtool.train.formats import check_columns, detect_format, resolve_chat_template


@dataclass(frozen=True)
class LossResult:
    mean_token_loss: float
    tokens: int  # trained positions counted
    examples: int  # examples with at least one trained position
    data_format: str

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_token_loss)


def tokenized_examples(data: EvalData, tokenizer: Any, task: PerplexityTask) -> tuple[Any, str]:
    """The task's examples tokenized and labelled as training labels them, and the data format."""
    columns = data.records.column_names
    if task.format == "auto":
        data_format = detect_format(columns, data.where)
    else:
        data_format = task.format
        check_columns(data_format, columns, data.where)
    template = resolve_chat_template(task.chat_template, tokenizer.chat_template, data_format)
    fingerprint = data_fingerprint("eval", data.dataset.sha256, task.limit, data_format, template, task.seq_len,
                                   task.train_on_prompt, tokenizer.backend_tokenizer.to_str())
    tokenized = tokenize_dataset(data.records, tokenizer, data_format=data_format, template=template,
                                 seq_len=task.seq_len, train_on_prompt=task.train_on_prompt, fingerprint=fingerprint,
                                 where=data.where)
    if tokenized.stats.kept == 0:
        raise InputError(f"none of the {tokenized.stats.examples} examples has a token to score (every label is "
                         "masked)", where=data.where,
                         fix="check the responses are not empty, raise seq_len, or set train_on_prompt")
    return tokenized.dataset, data_format


def mean_token_loss(model: Any, tokenizer: Any, data: EvalData, task: PerplexityTask, *, batch_size: int,
                    device: Any, advance: Callable[[int], object] = lambda count: None) -> LossResult:
    """The mean token loss of ``model`` on the task's data (see the module docstring)."""
    import torch

    dataset, data_format = tokenized_examples(data, tokenizer, task)
    lengths = dataset["length"]
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])  # similar lengths share a batch
    groups = group_micro_batches(order, lengths, batch_size=batch_size, seq_len=task.seq_len, packing=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total = 0.0
    count = 0
    with torch.no_grad():
        for group in groups:
            (batch,) = load_micro_batches(dataset, [group], packing=False, pad_id=pad_id, fallback=[0])
            batch = batch.to(device)
            total += float(model(**batch.inputs, num_items_in_batch=1, use_cache=False).loss)
            count += batch.trained
            advance(len(group))
    return LossResult(total / count, count, len(dataset), data_format)
