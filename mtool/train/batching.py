"""Which examples go into which micro-batch, and the tensors of a micro-batch.

Order: each epoch visits the examples in a permutation seeded by ``(seed, epoch)``, so the order of any step is
known without replaying the run: resuming at step *s* only needs *s*.

Micro-batches: without packing, ``micro_batch_size`` consecutive examples, right-padded to the longest with an
attention mask. With packing (padding-free), consecutive examples are gathered while their tokens fit in
``micro_batch_size * seq_len`` and laid end to end in one row; position ids restart at 0 for each example, which
is how the attention (SDPA or flash-attention varlen in ``transformers``) knows where one example ends: no token
attends across a boundary. The first label of each example is masked so no example learns to predict the next
one's first token; the loss over a packed row is then exactly the loss of the same examples padded.

Steps: a step takes ``grad_accum * world_size`` consecutive micro-batches; process *r* gets every
``world_size``-th of them starting at *r*. A process left without one at the very end of an epoch runs a copy
of another with every label masked (it adds nothing, but keeps the processes' gradient exchange in step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtool.train.data import IGNORE_INDEX

if TYPE_CHECKING:
    import numpy as np
    import torch


def epoch_order(count: int, seed: int, epoch: int, *, shuffle: bool = True) -> "np.ndarray":
    """The example indices of ``epoch`` in visiting order: a permutation seeded by ``(seed, epoch)``."""
    import numpy as np

    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch]).permutation(count)


def group_micro_batches(order: Sequence[int], lengths: Sequence[int], *, batch_size: int, seq_len: int,
                        packing: bool) -> list[list[int]]:
    """Split ``order`` into micro-batches: ``batch_size`` examples each, or (packing) at most
    ``batch_size * seq_len`` tokens each, examples kept whole and in order."""
    order = [int(i) for i in order]
    if not packing:
        return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    budget = batch_size * seq_len
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        length = int(lengths[index])
        if current and used + length > budget:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class StepPlan:
    """The micro-batches (example indices) of every optimizer step of a run, for one process."""

    steps: list[list[list[int]]]  # step -> this process's micro-batches -> example indices (empty: a masked copy)
    epochs: list[int]  # step -> epoch it belongs to
    steps_per_epoch: list[int]

    def __len__(self) -> int:
        return len(self.steps)


def plan_steps(lengths: Sequence[int], *, seed: int, epochs: int, max_steps: int | None, batch_size: int,
               seq_len: int, packing: bool, grad_accum: int, world_size: int, rank: int) -> StepPlan:
    """Every step's micro-batches for process ``rank``: ``epochs`` epochs, or as many (whole or cut) as
    ``max_steps`` needs."""
    steps: list[list[list[int]]] = []
    epoch_of: list[int] = []
    per_epoch: list[int] = []
    per_step = grad_accum * world_size
    epoch = 0
    while (max_steps is None and epoch < epochs) or (max_steps is not None and len(steps) < max_steps):
        groups = group_micro_batches(epoch_order(len(lengths), seed, epoch), lengths, batch_size=batch_size,
                                     seq_len=seq_len, packing=packing)
        count = math.ceil(len(groups) / per_step)
        for step in range(count):
            chunk = groups[step * per_step: (step + 1) * per_step]
            mine = chunk[rank::world_size]
            if not mine:  # the epoch's last step has too few micro-batches for this process
                mine = [[]]
            steps.append(mine)
            epoch_of.append(epoch)
        per_epoch.append(count)
        epoch += 1
    if max_steps is not None:
        steps, epoch_of = steps[:max_steps], epoch_of[:max_steps]
    return StepPlan(steps, epoch_of, per_epoch)


@dataclass
class MicroBatch:
    """The model inputs of one forward pass and what it counts."""

    inputs: dict[str, "torch.Tensor"]  # input_ids, labels, and attention_mask (padded) or position_ids (packed)
    tokens: int  # real (not padding) tokens
    trained: int  # positions whose next token is trained (the loss's denominator share)

    def to(self, device: "torch.device") -> "MicroBatch":
        return MicroBatch({k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}, self.tokens,
                          self.trained)


def collate(examples: Sequence[dict[str, Any]], *, packing: bool, pad_id: int, masked: bool = False) -> MicroBatch:
    """Tensors for ``examples`` (each with ``input_ids`` and ``labels``); ``masked``: every label -100."""
    import torch

    if packing:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for example in examples:
            ids.extend(example["input_ids"])
            labels.append(IGNORE_INDEX)  # never predict an example's first token from the previous example
            labels.extend(example["labels"][1:])
            positions.extend(range(len(example["input_ids"])))
        label_tensor = torch.tensor([labels])
        inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}
    else:
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        label_tensor = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            label_tensor[row, :length] = torch.tensor(example["labels"])
            attention[row, :length] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention}
    if masked:
        label_tensor.fill_(IGNORE_INDEX)
    inputs["labels"] = label_tensor
    tokens = sum(len(example["input_ids"]) for example in examples)
    trained = int((label_tensor[:, 1:] != IGNORE_INDEX).sum())
    return MicroBatch(inputs, tokens=0 if masked else tokens, trained=trained)


def load_micro_batches(dataset: Any, groups: Sequence[Sequence[int]], *, packing: bool, pad_id: int,
                       fallback: Sequence[int]) -> list[MicroBatch]:
    """The micro-batches of one step; an empty group becomes a fully masked copy of ``fallback``."""
    batches = []
    for group in groups:
        masked = not group
        rows = dataset[list(group or fallback)]
        examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(rows["input_ids"], rows["labels"])]
        batches.append(collate(examples, packing=packing, pad_id=pad_id, masked=masked))
    return batches
