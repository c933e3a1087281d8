"""The demo's base model: a tiny Llama-shaped model pre-trained on the spot on the general facts.

A random model knows no answer format, and fine-tunes of it share nothing a merge could build on. A few
seconds of full-parameter training on :func:`mtool.demo.tasks.general_task` give it the two question
forms, the answer format and sharp output logits, as a (very) small pre-trained model would have. It
then knows none of the demo's skill facts, which the adapters teach.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mtool.demo.tasks import Task

BASE_LICENSE = "apache-2.0"


@dataclass(frozen=True)
class BaseSettings:
    """Shape and pre-training of the demo base."""

    hidden_size: int = 128
    num_layers: int = 2
    vocab_size: int = 1024
    steps: int = 100
    lr: float = 3e-3
    seed: int = 0


def make_demo_base(folder: str | os.PathLike, corpus: list[str], pretraining: Task,
                   settings: BaseSettings = BaseSettings()) -> float:
    """Build the tokenizer on ``corpus``, pre-train a tiny model on ``pretraining`` and save both (with a
    license and a lineage record) to ``folder``; returns the final training loss.

    Every token of each conversation is trained (causal LM loss), full batch, AdamW at ``settings.lr``.
    """
    import torch

    from mtool.lineage import Dataset, Lineage, write_lineage
    from mtool.naming.card import write_card
    from mtool.tinymodels import TinySpec, build_model, build_tokenizer, save_model

    tokenizer = build_tokenizer(settings.vocab_size, corpus)
    spec = TinySpec(hidden_size=settings.hidden_size, intermediate_size=2 * settings.hidden_size,
                    num_layers=settings.num_layers, vocab_size=settings.vocab_size)
    model = build_model(spec, seed=settings.seed, tokenizer=tokenizer).train()
    input_ids, attention_mask = _encode(tokenizer, pretraining)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(settings.seed)
        for _ in range(settings.steps):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    final_loss = float(loss.detach())
    folder = save_model(model.eval(), tokenizer, folder, license=BASE_LICENSE)
    record = Lineage(operation="base", method="pretrain", seed=settings.seed,
                     parameters={"hidden_size": settings.hidden_size, "num_layers": settings.num_layers,
                                 "vocab_size": settings.vocab_size, "steps": settings.steps, "lr": settings.lr},
                     dataset=Dataset(id=f"mtool demo: {pretraining.name} facts", examples=len(pretraining.pairs)),
                     parameter_count=sum(p.numel() for p in model.parameters()),
                     metrics={"train_loss": round(final_loss, 4)})
    write_lineage(folder, record)
    write_card(folder)  # derived from the record, like every output's
    return final_loss


def _encode(tokenizer, task: Task):
    """The task's conversations as one right-padded batch: (input_ids, attention_mask)."""
    import torch

    rows = [tokenizer.apply_chat_template(record["messages"], return_dict=True)["input_ids"]
            for record in task.records()]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask

