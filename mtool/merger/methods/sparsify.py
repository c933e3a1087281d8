"""Sparsification of task vectors (deltas from the base): which entries of a delta survive.

Each whole-tensor function returns the sparsified delta ``delta * mask``, optionally rescaled so its L1 norm
matches the original (``rescale``):  ``out = (delta * mask) * ||delta||_1 / ||delta * mask||_1`` (unchanged when
either norm is below 1e-7). Random masks draw only from the generator they are given. (TIES' magnitude top-k and
DARE's Bernoulli masks are applied chunk by chunk in ``task_arithmetic.py``, with :func:`kth_largest` and
:func:`position_keep_mask`.)
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from mtool.seeding import hashed_seed

_RESCALE_EPS = 1e-7
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
RANDOM_BLOCK = 1 << 16  # entries drawn from one generator: randomness is fixed per block of positions


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


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept * ||delta||_1 / ||kept||_1``: keep the L1 mass of the delta after masking (in place on ``kept``)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def _finish(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    return rescale_l1(delta, kept) if rescale else kept


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor, exactly, in a few linear passes.

    ``torch.kthvalue`` on tens of millions of entries is slow on the CPU. Here a fixed sample of the values
    brackets the answer in a narrow band ``[low, high]`` (generous margins around the sample quantile);
    counting the entries above ``high`` and selecting within the band gives the exact k-th largest. When the
    band misses (practically never), the full selection runs. Counting and banding go part by part, so the
    temporaries stay small next to ``values``.
    """
    n = values.numel()
    if n <= 1 << 17:
        return torch.kthvalue(values, n - k + 1).values
    sample_size = 1 << 16
    picks = torch.randint(n, (sample_size,), generator=torch.Generator().manual_seed(0)).to(values.device)
    sample, _ = torch.sort(values[picks])
    quantile = 1 - k / n
    margin = 0.02
    low = sample[max(0, int((quantile - margin) * sample_size))]
    high = sample[min(sample_size - 1, int((quantile + margin) * sample_size))]
    above, band_parts = 0, []
    for part in values.split(1 << 22):  # bounded temporaries: boolean masks of one part at a time
        count, inside = _count_above_and_band(part, float(low), float(high))
        above += count
        band_parts.append(inside)
    band = torch.cat(band_parts)
    rank = k - above  # the answer is the rank-th largest inside the band
    if 1 <= rank <= band.numel():
        return torch.kthvalue(band, band.numel() - rank + 1).values
    return torch.kthvalue(values, n - k + 1).values


def _count_above_and_band(part: torch.Tensor, low: float, high: float) -> tuple[int, torch.Tensor]:
    """How many entries exceed ``high``, and the entries in ``[low, high]``. On the CPU with numpy, whose
    comparisons and boolean selections run 3-20x faster than torch's there."""
    numpy_can = part.device.type == "cpu" and not part.requires_grad and part.dtype in _NUMPY_FLOATS
    if not numpy_can:
        return int((part > high).sum()), part[(part >= low) & (part <= high)]
    array = part.numpy()
    return int(np.count_nonzero(array > high)), torch.from_numpy(array[(array >= low) & (array <= high)])


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``floor(gamma * n)`` largest entries (outliers) and the smallest ones so
    that ``floor(density * n)`` entries survive.

    Sorting by ``|delta|`` ascending, the survivors are ranks ``[n_bottom, n_bottom + n_keep)`` with
    ``n_keep = floor(density * n)`` and ``n_bottom = max(0, n - n_keep - floor(gamma * n))``: when density
    and gamma together exceed 1, fewer outliers are dropped so the density is kept.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    if n_keep <= 0 or n == 0:
        return torch.zeros_like(delta)
    n_bottom = max(0, n - n_keep - int(gamma * n))
    magnitudes = delta.abs().reshape(-1)
    order = torch.argsort(magnitudes, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bottom:n_bottom + n_keep]] = True
    return _finish(delta, mask.reshape(delta.shape), rescale)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, *, generator: torch.Generator | None,
                   rescale: bool = False) -> torch.Tensor:
    """DELLA MagPrune: keep each entry with a probability that grows with its magnitude rank in its row.

    For a row with ranks ``r = 1..m`` by ``|delta|`` (ascending), ``p = (density - epsilon) + 2 * epsilon *
    (r - 1) / (m - 1)``, so the mean keep rate is ``density``. A 1-D tensor is one row.
    Needs ``0 < density - epsilon`` and ``density + epsilon < 1``.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float32)  # 0-based
    width = rows.shape[1]
    rank_norm = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    probabilities = (density - epsilon) + rank_norm * (2 * epsilon)
    draws = torch.rand(probabilities.shape, generator=generator, dtype=torch.float32)
    mask = (draws.to(probabilities.device) < probabilities).reshape(delta.shape)
    return _finish(delta, mask, rescale)
