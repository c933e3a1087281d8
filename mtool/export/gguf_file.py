"""Writing a GGUF file tensor by tensor: gguf-py lays it out, mtool streams the tensor data into place.

gguf-py's ``GGUFWriter`` is given every key and every tensor's name, shape and encoding first; it decides the
shards (``split_max_size``: ``<stem>-00001-of-0000N.gguf``, each shard with its ``split.*`` keys) and writes each
shard's header, keys and tensor index. The data offsets follow from the GGUF layout (each tensor at a multiple of
the alignment after the index, in the declared order), so :class:`GGUFFileWriter` then writes every part of every
tensor straight into its place with positioned writes, as the stream produces them: no tensor is held whole, and
the file is byte for byte what ``GGUFWriter.write_tensors_to_file`` writes for the same tensors (a test checks).
Written in order, each shard is hashed on the way.

It is the writer :func:`mtool.stream.stream_tensors` drives (``specs``, ``write_part``), with parts as bytes:
``write_part(name, byte_offset, uint8 tensor)``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from mtool.errors import CheckpointError
from mtool.io.hashing import BackgroundDigests
from mtool.io.writing import PositionedFiles, pwrite_all

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ByteSpec:
    """A tensor as the writer sees it: its GGUF name and size in bytes."""

    name: str
    nbytes: int


@dataclass
class _Placed:
    shard: int
    offset: int  # absolute offset of the tensor's data in its shard
    nbytes: int
    end: int  # where the next tensor's data begins (after the alignment padding)


class GGUFFileWriter(PositionedFiles):
    """Streams the tensor data of a fully declared ``gguf.GGUFWriter`` into ``path`` (module docstring).

    Every tensor must be written exactly once; :meth:`close` checks that. On an exception inside ``with``, the
    files are closed and left for the caller's staging folder to remove.
    """

    def __init__(self, declared: gguf.GGUFWriter, path: Path) -> None:
        self.path = Path(path)
        self.files = declared.format_shard_names(self.path)
        order = [(shard, name, info.nbytes) for shard, tensors in enumerate(declared.tensors)
                 for name, info in tensors.items()]
        declared.write_header_to_file(self.path)
        declared.write_kv_data_to_file()
        declared.write_ti_data_to_file()
        assert declared.fout is not None
        data_starts = []
        for fout in declared.fout:
            fout.flush()
            data_starts.append(gguf.GGUFWriter.ggml_pad(fout.tell(), declared.data_alignment))
        declared.close()
        self._placed: dict[str, _Placed] = {}
        ends = list(data_starts)
        for shard, name, nbytes in order:
            offset = ends[shard]
            ends[shard] = offset + gguf.GGUFWriter.ggml_pad(nbytes, declared.data_alignment)
            self._placed[name] = _Placed(shard, offset, nbytes, ends[shard])
        self.specs = [ByteSpec(name, nbytes) for _, name, nbytes in order]
        self._fds: list[int] = []
        self._hashers: list["hashlib._Hash | None"] = []
        self._hashed_to: list[int] = []
        self._sizes = ends
        for file, data_start, size in zip(self.files, data_starts, ends):
            fd = os.open(file, os.O_RDWR)
            self._fds.append(fd)
            os.ftruncate(fd, size)  # the padding before and after tensors is zeros, as gguf-py writes it
            self._hashers.append(hashlib.sha256(os.pread(fd, data_start, 0)))
            self._hashed_to.append(data_start)
        self._hashing = BackgroundDigests(self._hashers)
        self._received: dict[str, int] = {}

    def write_part(self, name: str, start: int, values: "torch.Tensor") -> None:
        """Write the bytes ``values`` (uint8) at byte ``start`` of tensor ``name``'s data."""
        placed = self._placed.get(name)
        if placed is None:
            raise CheckpointError(f"tensor {name!r} was not declared in the GGUF file")
        data = memoryview(values.detach().contiguous().reshape(-1).numpy()).cast("B")
        if start < 0 or start + len(data) > placed.nbytes:
            raise CheckpointError(f"bytes [{start}, {start + len(data)}) are outside GGUF tensor {name!r}")
        received = self._received.get(name, 0) + len(data)
        if received > placed.nbytes:
            raise CheckpointError(f"GGUF tensor {name!r} is written twice")
        offset = placed.offset + start
        pwrite_all(self._fds[placed.shard], data, offset)
        self._received[name] = received
        self._hash(placed.shard, offset, data)
        if received == placed.nbytes and placed.end > placed.offset + placed.nbytes:
            self._hash(placed.shard, placed.offset + placed.nbytes, memoryview(bytes(placed.end - placed.offset
                                                                                      - placed.nbytes)))

    def _hash(self, shard: int, offset: int, data: memoryview) -> None:
        if self._hashers[shard] is not None and offset == self._hashed_to[shard]:
            self._hashing.feed(shard, data)
            self._hashed_to[shard] += len(data)
        else:
            self._hashers[shard] = None  # written out of order: hashed from disk instead

    @property
    def digests(self) -> dict[str, str]:
        """``{file name: sha256}`` of the shards hashed while written (complete after the last write)."""
        self._hashing.finish()
        return {file.name: hasher.hexdigest() for file, hasher, done, size in
                zip(self.files, self._hashers, self._hashed_to, self._sizes) if hasher is not None and done == size}

    def close(self) -> list[Path]:
        """Finish: every declared tensor must have been written. Returns the files."""
        missing = [name for name, placed in self._placed.items() if self._received.get(name, 0) != placed.nbytes]
        self._close_fds()
        if missing:
            raise CheckpointError(f"{len(missing)} GGUF tensors were not written, e.g. {missing[0]!r}")
        return self.files
