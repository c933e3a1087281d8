"""Sparsification of task vectors (deltas from the base), as mergekit 0.1.5 does it: which entries survive.

* magnitude (TIES): the ``k = max(1, floor(density n))`` largest ``|delta|``, with the tie order of torch's
  sort (:mod:`~mtool.merger.methods.selection`); nothing for ``density <= 0``, everything for ``density >= 1``;
* magnitude outliers (Model Breadcrumbs): sorting ``|delta|`` ascending, ranks ``[n_bottom, n_bottom + n_keep)``
  with ``n_keep = floor(density n)`` and ``n_bottom = max(0, n - n_keep - floor(gamma n))``;
* random (DARE): each entry with probability ``density`` (as mergekit rounds it: to bfloat16 for bfloat16 task
  vectors, else to float32), from seeded, order-independent draws (:func:`position_keep_mask`);
* DELLA MagPrune: with probability ``(density - epsilon) + 2 epsilon (rank - 1) / (m - 1)`` by the entry's
  magnitude rank in its row of ``m`` (computed in the same dtype as mergekit: bfloat16 ranks round above 256).

``rescale`` (DARE and DELLA by default) multiplies the kept entries by ``||delta||_1 / ||kept||_1`` (unchanged when
either sum is below 1e-7), the ratio computed in the task vector's dtype.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from mtool.merger.methods.selection import sorted_prefixes
from mtool.seeding import hashed_seed

RESCALE_EPS = 1e-7
RANDOM_BLOCK = 1 << 16  # entries drawn from one generator: randomness is fixed per block of positions


def random_work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mergekit draws and rescales DARE/DELLA masks in on a CPU: bfloat16 stays, others float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def rounded_probability(density: float, dtype: torch.dtype) -> float:
    """A keep probability as mergekit hands it to ``torch.bernoulli``: ``density`` rounded to ``dtype``."""
    return float(torch.tensor(density, dtype=dtype))


def position_keep_mask(seed: int, member: int, offset: int, count: int, density: float) -> torch.Tensor:
    """Bernoulli(``density``) keep masks: 1 (uint8) where a position's uniform draw ``u`` is below ``density``
    (rounded to float32), for the flattened positions ``offset .. offset + count`` of one input.

    Each block of ``RANDOM_BLOCK`` positions has its own generator seeded from (seed, member, block), so
    the draw of a position does not depend on how a tensor is split into chunks, nor on the device. The
    generator is numpy's PCG64 (on the CPU, whatever the device). A position's draw is numpy's float32 uniform
    ``u = (x >> 8) / 2^24`` of its 32-bit output ``x`` (the low, then the high half of each 64-bit output);
    ``u < d`` exactly when ``x < 256 * ceil(d * 2^24)``, which is what is compared, on the raw outputs.
    """
    limit = 256 * math.ceil(float(np.float32(density)) * 2**24)
    out = np.empty(count, dtype=np.bool_)
    if limit <= 0 or limit >= 2**32:
        out.fill(limit > 0)
        return torch.from_numpy(out.view(np.uint8))
    position = offset
    while position < offset + count:
        block = position // RANDOM_BLOCK
        start = position - block * RANDOM_BLOCK
        take = min(RANDOM_BLOCK - start, offset + count - position)
        generator = np.random.PCG64(hashed_seed(seed, member, block))
        generator.advance(start // 2)
        skip = start % 2  # an odd start begins with the high half of a 64-bit output
        draws = _low_then_high_halves(generator.random_raw((skip + take + 1) // 2))[skip:skip + take]
        np.less(draws, limit, out=out[position - offset:position - offset + take])
        position += take
    return torch.from_numpy(out.view(np.uint8))


def _low_then_high_halves(outputs: np.ndarray) -> np.ndarray:
    """The 32-bit draws of 64-bit generator outputs, in the generator's order: low half, then high half."""
    if sys.byteorder == "little":
        return outputs.view(np.uint32)
    return np.stack([outputs & 0xFFFFFFFF, outputs >> 32], axis=1).astype(np.uint32).reshape(-1)


def rescale_factor(before: float, after: float, dtype: torch.dtype) -> torch.Tensor | None:
    """``before / after`` (L1 norms of a delta and of its kept entries) in ``dtype`` as mergekit computes it
    (both rounded to ``dtype`` first); None when either is below 1e-7 (no rescale)."""
    before_t, after_t = torch.tensor(before, dtype=dtype), torch.tensor(after, dtype=dtype)
    if bool(before_t < RESCALE_EPS) or bool(after_t < RESCALE_EPS):
        return None
    return before_t / after_t


def rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta * mask``, times ``||delta||_1 / ||delta * mask||_1`` with ``rescale`` (whole tensors)."""
    kept = delta * mask
    if not rescale:
        return kept
    factor = rescale_factor(float(delta.abs().sum()), float(kept.abs().sum()), delta.dtype)
    return kept if factor is None else kept * factor


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``floor(gamma n)`` largest entries (outliers) and the smallest ones so that
    ``floor(density n)`` survive (see the module docstring), with torch's sort order among equal magnitudes."""
    if density >= 1:
        return delta
    count = delta.numel()
    keep = int(density * count)
    top = int(gamma * count)
    bottom = max(0, count - keep - top)
    magnitudes = delta.abs().reshape(-1).float().cpu().numpy()
    order, _ = sorted_prefixes(magnitudes, [bottom, bottom + keep], descending=False, in_place=True)
    order = order[bottom:bottom + keep]
    mask = torch.zeros(count, dtype=delta.dtype)
    mask[torch.from_numpy(order.astype(np.int64))] = 1
    return rescaled(delta, mask.reshape(delta.shape).to(delta.device), rescale)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of every entry (rows along the last dimension; a 1-D tensor is one row), in
    mergekit's dtype: ranks by ``|delta|`` within the row (torch's sort order for equal magnitudes),
    ``p = (density - epsilon) + (rank - 1) / (m - 1) * 2 * epsilon``."""
    work = random_work_dtype(delta.dtype)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, *, generator: torch.Generator | None,
                   rescale: bool = False) -> torch.Tensor:
    """DELLA MagPrune: keep each entry with its :func:`della_probabilities` probability (uniform draws from
    ``generator`` compared with the probability), then rescale in mergekit's work dtype.
    Needs ``0 < density - epsilon`` and ``density + epsilon < 1`` (checked when the recipe is planned)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probabilities = della_probabilities(delta, density, epsilon)
    draws = torch.rand(probabilities.shape, generator=generator, dtype=torch.float32)
    work = probabilities.dtype
    mask = (draws.to(probabilities.device) < probabilities.float()).to(work).reshape(delta.shape)
    return rescaled(delta.to(work), mask, rescale).to(delta.dtype)
