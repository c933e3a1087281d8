"""Writing safetensors weights: every output tensor is announced first, then streamed straight into its place.

:class:`CheckpointWriter` is told every output tensor (name, shape, dtype) up front, so it lays out the shards,
writes each shard's safetensors header first, and then puts every tensor (or every part of one) straight into its
place as it is produced, in any order: no shard is ever buffered in memory. A single-shard output is byte-for-byte
what ``safetensors.torch.save_file`` writes for the same tensors; shards are named as transformers names them
(``model.safetensors``, ``model-00001-of-00003.safetensors`` with ``model.safetensors.index.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.errors import CheckpointError
from mtool.io.dtypes import RANK, dtype_to_safetensors, element_bits
from mtool.io.hashing import BackgroundDigests
from mtool.io.reading import SAFETENSORS_INDEX_SUFFIX

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 5 * 1000**3  # 5GB, the Hub's usual shard size


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor announced to the writer before any data: name, shape, torch dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"

    @property
    def dtype_name(self) -> str:
        return dtype_to_safetensors(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return (self.numel * element_bits(self.dtype_name) + 7) // 8


@dataclass
class _Shard:
    path: Path
    specs: list[TensorSpec]
    offsets: dict[str, int] = field(default_factory=dict)  # absolute offset of each tensor's data
    size: int = 0


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut the tensors, in the given order, into shards of at most ``max_shard_bytes`` each.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def safetensors_layout(specs: Sequence[TensorSpec], metadata: dict[str, str],
                       keep_order: bool = False) -> tuple[bytes, dict[str, int]]:
    """The header bytes of one shard and each tensor's offset relative to the data start.

    By default the same layout as safetensors' own writer: tensors sorted by dtype rank (descending) then
    name, packed without gaps; compact JSON with ``__metadata__`` first; header padded with spaces to a
    multiple of 8 bytes. ``keep_order`` lays the tensors out in the announced order instead.
    """
    ordered = list(specs) if keep_order else sorted(specs, key=lambda s: (-RANK[s.dtype_name], s.name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    position = 0
    for spec in ordered:
        header[spec.name] = {"dtype": spec.dtype_name, "shape": list(spec.shape),
                             "data_offsets": [position, position + spec.nbytes]}
        offsets[spec.name] = position
        position += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def planned_bytes(specs: Sequence[TensorSpec], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  metadata: dict[str, str] | None = None, in_order: bool = False) -> int:
    """The bytes :class:`CheckpointWriter` will write for ``specs`` (every shard, headers included, and an
    allowance for the shard index), known before anything is written: for the free-space check."""
    groups = plan_shards(specs, max_shard_bytes)
    header_metadata = {"format": "pt", **(metadata or {})}
    total = sum(len(safetensors_layout(group, header_metadata, keep_order=in_order)[0])
                + sum(spec.nbytes for spec in group) for group in groups)
    if len(groups) > 1:  # the index: a line per tensor
        total += 200 + sum(len(spec.name) + 50 for spec in specs)
    return total


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of the open file ``fd`` (positioned writes, the file offset untouched)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class PositionedFiles:
    """What every streaming writer shares: output files open for positioned writes (``_fds``), hashed in file order
    on the way (``_hashing``), closed on success by :meth:`close` (which checks the output is complete) and on
    failure, when the ``with`` block raises, by :meth:`_close_fds` alone."""

    _fds: list[int]
    _hashing: BackgroundDigests

    def close(self) -> list[Path]:
        raise NotImplementedError

    def _close_fds(self) -> None:
        self._hashing.finish()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_fds()


class CheckpointWriter(PositionedFiles):
    """Streams announced tensors straight into their places in safetensors shards.

    ``specs`` lists every output tensor in the order shards are filled. Headers are written when the
    writer opens; :meth:`write` puts one tensor at its offset (any order, each exactly once);
    :meth:`close` checks that every tensor arrived and writes ``<stem>.safetensors.index.json`` when
    there is more than one shard.

    ``in_order=True`` lays tensors out in the announced order; when they are then also written in that
    order, each shard's sha256 is computed on the way (:attr:`digests`), so the output need not be read
    back to be hashed.
    """

    def __init__(self, folder: str | os.PathLike, specs: Sequence[TensorSpec], *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, file_stem: str = "model",
                 metadata: dict[str, str] | None = None, in_order: bool = False) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise CheckpointError(f"output tensor {duplicate!r} is announced twice")
        self.folder = Path(folder)
        self.file_stem = file_stem
        self.metadata = {"format": "pt", **(metadata or {})}
        groups = plan_shards(specs, max_shard_bytes)
        count = len(groups)
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, TensorSpec]] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()
        self._received: dict[str, int] = {}  # elements received per tensor (parts)
        self._hashers: list["hashlib._Hash | None"] = []  # None once a shard's writes leave the file order
        self._hashed_to: list[int] = []
        self._hashing = BackgroundDigests(self._hashers)
        for number, group in enumerate(groups, start=1):
            filename = (f"{file_stem}.safetensors" if count == 1
                        else f"{file_stem}-{number:05d}-of-{count:05d}.safetensors")
            shard = _Shard(self.folder / filename, list(group))
            header, relative = safetensors_layout(group, self.metadata, keep_order=in_order)
            shard.offsets = {name: len(header) + offset for name, offset in relative.items()}
            shard.size = len(header) + sum(spec.nbytes for spec in group)
            fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, shard.size)
            self._hashers.append(hashlib.sha256(header) if in_order else None)
            self._hashed_to.append(len(header))
            for spec in group:
                self._where[spec.name] = (len(self._shards), spec)
            self._shards.append(shard)

    @property
    def files(self) -> list[Path]:
        return [shard.path for shard in self._shards]

    @property
    def specs(self) -> list[TensorSpec]:
        """Every announced tensor, in the announced order."""
        return [spec for _, spec in self._where.values()]

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Write ``tensor`` (shape and dtype as announced) into its place."""
        spec = self._spec(name)
        if tuple(tensor.shape) != tuple(spec.shape):
            raise CheckpointError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, announced as "
                                  f"{tuple(spec.shape)} {spec.dtype}")
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, start: int, values: "torch.Tensor") -> None:
        """Write ``values`` (the announced dtype) at flat element ``start`` of tensor ``name``; a tensor may
        arrive in consecutive parts, each written straight into its place. It counts as written once
        all of its bytes have arrived."""
        import torch

        spec = self._spec(name)
        if values.dtype != spec.dtype:
            raise CheckpointError(f"tensor {name!r} is {values.dtype}, announced as {spec.dtype}")
        shard_number, _ = self._where[name]
        shard = self._shards[shard_number]
        itemsize = spec.nbytes // max(1, spec.numel)
        count = values.numel()
        if start < 0 or start + count > spec.numel:
            raise CheckpointError(f"part [{start}, {start + count}) is outside tensor {name!r}")
        if count:
            data = memoryview(values.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
            offset = shard.offsets[name] + start * itemsize
            pwrite_all(self._fds[shard_number], data, offset)
            if self._hashers[shard_number] is not None and offset == self._hashed_to[shard_number]:
                self._hashing.feed(shard_number, data)
                self._hashed_to[shard_number] += len(data)
            else:
                self._hashers[shard_number] = None
        self._received[name] = self._received.get(name, 0) + count
        if self._received[name] == spec.numel:
            self._written.add(name)

    def _spec(self, name: str) -> TensorSpec:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} was not announced to the writer")
        if name in self._written:
            raise CheckpointError(f"tensor {name!r} is written twice")
        return self._where[name][1]

    @property
    def digests(self) -> dict[str, str]:
        """``{file name: sha256}`` of the shards hashed while writing (complete only after every write)."""
        self._hashing.finish()
        return {shard.path.name: hasher.hexdigest() for shard, hasher, done in
                zip(self._shards, self._hashers, self._hashed_to) if hasher is not None and done == shard.size}

    def close(self) -> list[Path]:
        """Finish: every announced tensor must have been written. Returns the weight files."""
        missing = [name for name in self._where if name not in self._written]
        self._close_fds()
        if missing:
            raise CheckpointError(f"{len(missing)} announced tensors were never written, e.g. {missing[0]!r}")
        if len(self._shards) > 1:
            weight_map = {spec.name: shard.path.name for shard in self._shards for spec in shard.specs}
            index = {
                "metadata": {"total_size": sum(spec.nbytes for _, spec in self._where.values())},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / f"{self.file_stem}{SAFETENSORS_INDEX_SUFFIX}").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.files


def save_tensors(folder: str | os.PathLike, tensors: dict[str, "torch.Tensor"], *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, file_stem: str = "model",
                 metadata: dict[str, str] | None = None) -> list[Path]:
    """Write an in-memory state dict with :class:`CheckpointWriter` (small outputs such as adapters)."""
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with CheckpointWriter(folder, specs, max_shard_bytes=max_shard_bytes, file_stem=file_stem,
                          metadata=metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer.files
