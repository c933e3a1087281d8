"""Process settings a streaming command changes for its duration, always restored: torch's thread count and
glibc's allocator thresholds.

Threads. The streaming executor (:mod:`mtool.stream`) runs its math in one torch thread: the other cores read,
write and hash in parallel, and small chunks do not pay for waking a thread team on every operation.

Allocator (glibc only; elsewhere nothing changes). Above its mmap threshold glibc serves an allocation with a
fresh ``mmap`` and returns it with ``munmap`` on free; below it, from its heap, which keeps freed memory for reuse
(up to the trim threshold). Each streaming command picks the policy that suits its allocations:

* :data:`REUSE_FREED_BUFFERS` (``mtool merge``): the same few chunk-sized buffers (a few MB each) are allocated
  and freed thousands of times. With torch's huge-page-aligned allocations (``THP_MEM_ALLOC_ENABLE=1``, set by
  the ``mtool`` executable) glibc would map each one afresh, paying a page fault and the kernel's zeroing for
  every page: measured, upcasting a 1M-element bf16 chunk to float32 took 0.92 ms that way and 0.09 ms in reused
  heap memory (0.17 ms with neither setting). Blocks below 32 MiB come from the heap, 64 MiB of freed heap is kept.
* :data:`RETURN_FREED_MEMORY` (``mtool adapters merge``): whole tensors of a few MiB to tens of MiB stream
  through worker threads; every block of 1 MiB or more is mapped, so resident memory stays at the tensors held.

glibc has no call that reads these thresholds, so :func:`allocator_policy` restores the values it set itself
last, or glibc's initial 128 KiB for both; glibc's own dynamic raising of the mmap threshold, which any explicit
setting switches off, cannot be switched back on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from dataclasses import dataclass

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class AllocatorPolicy:
    """glibc thresholds: allocations of at least ``mmap_bytes`` are mapped; ``trim_bytes`` of freed heap are kept."""

    mmap_bytes: int = GLIBC_DEFAULT_THRESHOLD
    trim_bytes: int = GLIBC_DEFAULT_THRESHOLD


GLIBC_DEFAULT = AllocatorPolicy()
REUSE_FREED_BUFFERS = AllocatorPolicy(mmap_bytes=32 * 2**20, trim_bytes=64 * 2**20)
RETURN_FREED_MEMORY = AllocatorPolicy(mmap_bytes=1 << 20)

_current = GLIBC_DEFAULT
_lock = threading.Lock()


def _libc_function(function: str):
    """glibc's ``function`` (``mallopt``, ``malloc_trim``), or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def _release_kept_heap() -> None:
    """Give the freed heap a policy kept (up to its ``trim_bytes``) back to the system: with the earlier
    thresholds restored, large blocks are then mapped afresh again instead of carved from that heap."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _apply(policy: AllocatorPolicy) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, policy.mmap_bytes))
    return bool(mallopt(M_TRIM_THRESHOLD, policy.trim_bytes)) and done


@contextlib.contextmanager
def allocator_policy(policy: AllocatorPolicy) -> Iterator[bool]:
    """Set glibc's thresholds to ``policy`` for the ``with`` block; yields whether that took effect."""
    global _current
    with _lock:
        previous, _current = _current, policy
        applied = _apply(policy)
    try:
        yield applied
    finally:
        with _lock:
            _current = previous
            if applied:
                _apply(previous)
                _release_kept_heap()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch's intra-op math on ``count`` threads for the ``with`` block, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
