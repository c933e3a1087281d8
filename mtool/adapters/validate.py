"""Checks of the options the adapter commands share (one message each, raised before any work)."""

from __future__ import annotations

from mtool.errors import InputError


def adapter_weights(count: int, weights: tuple[float, ...] | None, action: str) -> tuple[float, ...]:
    """One weight per adapter (default 1 each); ``action`` ("merge", "combine") names the command."""
    if count == 0:
        raise InputError(f"give at least one adapter to {action}")
    if weights is None:
        return tuple(1.0 for _ in range(count))
    if len(weights) != count:
        raise InputError(f"--weights has {len(weights)} values for {count} adapters",
                         fix="give one weight per adapter, in the same order")
    return tuple(float(w) for w in weights)


def positive_rank(rank: int | None) -> int | None:
    """``rank`` itself when it is None or a positive integer; an error otherwise."""
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise InputError(f"the rank must be a positive integer, got {rank}", where="--rank")
    return rank
