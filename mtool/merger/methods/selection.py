"""Which entries torch's CPU sort puts first: the exact sets mergekit's magnitude selections keep.

mergekit selects by sorting: TIES keeps ``argsort(|delta|, descending=True)[:k]``, Model Breadcrumbs a window
``sort(|delta|).indices[lo:hi]`` of the ascending order. Where magnitudes are equal at the edge of the kept set
(bfloat16 task vectors have thousands of equal magnitudes), which of them are kept is decided by the sort
algorithm itself: torch's CPU sort runs libstdc++'s ``std::sort`` (introsort) on (value, index) pairs, comparing
values only. :func:`sorted_prefixes` gives the same sets without sorting: the compiled helper ``_sortpath``
replays ``std::sort`` only on the ranges that contain a requested boundary (about 2.3 n element visits instead
of n log n: faster than finding the k-th largest value by sampling). Without the helper (no C compiler when
mtool was installed), or where it disagrees with the local torch on a self-check (another C++ library), the
sort itself runs: the same sets, slower.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_SELF_CHECK_SIZE = 4099


@functools.cache
def native_available() -> bool:
    """Whether the compiled helper is importable and agrees with the local torch's sort on tie-heavy data."""
    try:
        from mtool.merger.methods import _sortpath
    except ImportError:
        return False
    generator = np.random.default_rng(20240611)
    values = generator.integers(0, 7, _SELF_CHECK_SIZE).astype(np.float32)
    for descending in (True, False):
        boundaries = [_SELF_CHECK_SIZE // 3, _SELF_CHECK_SIZE // 2]
        order = _replay(_sortpath, values, boundaries, descending)
        reference = torch.sort(torch.from_numpy(values), descending=descending, stable=False).indices.numpy()
        for boundary in boundaries:
            if set(order[:boundary].tolist()) != set(reference[:boundary].tolist()):
                return False
    return True


def _replay(module, values: np.ndarray, boundaries: Sequence[int], descending: bool) -> np.ndarray:
    work = np.array(values, dtype=np.float32, copy=True)
    index = np.empty(work.size, dtype=np.uint32)
    module.follow(work, index, list(boundaries), descending, True)
    return index


class _Scratch(threading.local):
    """Per-thread buffers kept between tensors: large arrays allocated afresh for every tensor would each be
    mapped by the C library and cost a page fault per page."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, count: int, dtype) -> np.ndarray:
        array = self.arrays.get(name)
        if array is None or array.size < count or array.dtype != dtype:
            array = np.empty(max(count, 1), dtype=dtype)
            self.arrays[name] = array
        return array[:count]


SCRATCH = _Scratch()


def scratch(name: str, count: int, dtype) -> np.ndarray:
    """A flat array of ``count`` elements for this thread's ``name``d scratch (contents undefined), reused
    between calls."""
    return SCRATCH.get(name, count, np.dtype(dtype))


def keys_as_floats(keys: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 values of selection keys: float32 as they are, 16-bit bit patterns (uint16) decoded as ``dtype``."""
    if keys.dtype == np.uint16:
        return torch.from_numpy(keys.view(np.int16)).view(dtype).float()
    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))


def sorted_prefixes(values: np.ndarray, boundaries: Sequence[int], *, descending: bool, in_place: bool = False,
                    dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(order, ordered)``: a permutation ``order`` of ``range(len(values))`` such that, for every boundary
    ``b``, ``order[:b]`` holds the same positions as ``torch.sort(values, descending=descending,
    stable=False).indices[:b]`` (as sets; the order inside is not the sort's), and ``ordered = values[order]``.

    ``values`` is flat: float32, or the uint16 bit patterns of non-negative ``dtype`` (bfloat16/float16) values,
    which order like the values and take half the memory. With ``in_place`` it may be permuted and returned as
    ``ordered`` (it is scratch), else it is left as it is."""
    count = values.size
    boundaries = sorted({int(b) for b in boundaries if 0 < int(b) < count})
    if not boundaries:
        return np.arange(count, dtype=np.int64), values
    if native_available() and count < 2**32 and values.dtype in (np.float32, np.uint16):
        from mtool.merger.methods import _sortpath

        reuse = in_place and values.flags.c_contiguous and values.flags.writeable
        work = values if reuse else values.copy()
        index = scratch("selection-index", count, np.uint32)
        _sortpath.follow(work, index, boundaries, descending, True)
        return index, work
    ordered, order = torch.sort(keys_as_floats(values, dtype), descending=descending, stable=False)
    order = order.numpy()
    return order, (values[order] if values.dtype == np.uint16 else ordered.numpy())


@dataclass(frozen=True)
class KeptByMagnitude:
    """The entries a magnitude selection keeps, in a form a chunked pass can apply: every entry whose
    magnitude is above ``threshold`` (at or above when ``inclusive``), except the ``dropped`` positions (sorted),
    which all have magnitude exactly ``threshold``. ``threshold`` None keeps everything, ``inf`` nothing."""

    threshold: float | None
    dropped: np.ndarray

    @classmethod
    def everything(cls) -> "KeptByMagnitude":
        return cls(None, np.empty(0, dtype=np.int64))

    @classmethod
    def nothing(cls) -> "KeptByMagnitude":
        return cls(float("inf"), np.empty(0, dtype=np.int64))

    def dropped_in(self, offset: int, count: int) -> np.ndarray:
        """The dropped positions in ``[offset, offset + count)``, relative to ``offset``."""
        low, high = np.searchsorted(self.dropped, [offset, offset + count])
        return self.dropped[low:high] - offset


def top_k_by_magnitude(magnitudes: np.ndarray, k: int, dtype: torch.dtype = torch.float32) -> KeptByMagnitude:
    """The ``k`` largest entries of ``magnitudes`` (flat, non-negative, finite: float32, or the uint16 bits of
    ``dtype`` values; used as scratch) with torch's tie order: the set ``argsort(magnitudes, descending=True)[:k]``."""
    count = magnitudes.size
    if k >= count:
        return KeptByMagnitude.everything()
    if k <= 0:
        return KeptByMagnitude.nothing()
    order, ordered = sorted_prefixes(magnitudes, [k], descending=True, in_place=True, dtype=dtype)
    smallest = ordered[:k].min()
    threshold = float(keys_as_floats(np.array([smallest]), dtype)[0])
    tail = ordered[k:]
    dropped = np.sort(order[k:][tail == smallest].astype(np.int64))
    return KeptByMagnitude(threshold, dropped)
