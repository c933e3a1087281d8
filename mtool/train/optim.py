"""Optimizers and the learning-rate schedule.

The schedule is a pure function of the step, so "the scheduler's state" is the step counter stored in every
checkpoint: a resumed run sets exactly the learning rates the uninterrupted run would have set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mtool.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from mtool.train.config import TrainingSettings


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warm-up (``step < W``): ``(step + 1) / W``, rising linearly to 1 at the last warm-up step.
    After it, with progress ``p = (step - W) / max(1, T - W)`` in ``[0, 1)`` and floor ``m = min_ratio``:

    - constant: ``1``
    - linear:   ``m + (1 - m) (1 - p)``
    - cosine:   ``m + (1 - m) (1 + cos(pi p)) / 2``
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"unknown schedule {schedule!r}", where="training.schedule")


def warmup_steps_for(settings: "TrainingSettings", total_steps: int) -> int:
    """``warmup_steps`` when given, else ``ceil(warmup_ratio * total_steps)``."""
    if settings.warmup_steps is not None:
        return settings.warmup_steps
    return math.ceil(settings.warmup_ratio * total_steps)


def build_optimizer(parameters: Iterable["torch.nn.Parameter"], settings: "TrainingSettings",
                    device: "torch.device") -> "torch.optim.Optimizer":
    """AdamW (torch; fused on CUDA), 8-bit AdamW, paged AdamW or paged 8-bit AdamW (bitsandbytes).

    Weight decay applies to the LoRA matrices only, never to DoRA magnitudes or biases (1-d parameters).
    """
    import torch

    parameters = list(parameters)
    decayed = [p for p in parameters if p.dim() >= 2]
    plain = [p for p in parameters if p.dim() < 2]
    groups = [g for g in ({"params": decayed, "weight_decay": settings.weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    common = dict(lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **common)
    import bitsandbytes as bnb

    if settings.optimizer.startswith("paged") and device.type != "cuda":
        raise ConfigError(f"training.optimizer {settings.optimizer} pages its state between GPU and CPU memory and "
                          "needs a CUDA GPU", where="training.optimizer", fix="use adamw or adamw_8bit")
    factory = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[settings.optimizer]
    return factory(groups, **common)


def set_learning_rate(optimizer: "torch.optim.Optimizer", lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
