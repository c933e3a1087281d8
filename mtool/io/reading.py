"""Reading safetensors weights: headers first, tensor bytes only when asked for.

:func:`open_checkpoint` opens a model folder (single ``model.safetensors`` or sharded with
``model.safetensors.index.json``), a PEFT adapter folder (``adapter_model.safetensors``) or one ``.safetensors``
file. Names, shapes and dtypes come from the headers alone, validated (a truncated download or a corrupt header is
reported with the file's name). Pickle weights (``.bin``, ``.pt``) are refused: unpickling runs arbitrary code.

How bytes are read, one policy per access pattern:

* a slice of a tensor (the streamed merge reads 1M-element chunks): :func:`read_elements`, a positioned read
  (``preadv``) into a fresh buffer. Resident memory stays at the chunks in flight.
* a whole tensor that is kept, changed, or outlives the pass (adapters, merges of whole tensors):
  :meth:`Checkpoint.read`, the same positioned read into a fresh tensor that the caller owns.
* a whole tensor read once and released right away (adapter merge copies or transforms every base tensor):
  :meth:`Checkpoint.map`, a private copy-on-write mapping of that tensor's pages only, which saves the copy from
  the page cache. The mapping, and the pages it made resident, go when the tensor is freed.

The header parser is mtool's own: safetensors' ``safe_open`` validates a header as strictly but does not expose
the byte offsets that positioned reads and mappings need (``benchmarks/io_bench.py`` compares the two).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.errors import CheckpointError, UnsafeWeightsError
from mtool.io.dtypes import dtype_from_safetensors, element_bits

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its name, shape, safetensors dtype, file and byte range inside that file."""

    name: str
    shape: tuple[int, ...]
    dtype_name: str
    file: Path
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def dtype(self) -> "torch.dtype":
        return dtype_from_safetensors(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header without reading tensor data.

    Returns ``(tensors, metadata)``. Raises :class:`CheckpointError` naming the file when the header is
    unreadable, a tensor's byte range does not match its shape and dtype, or the file is shorter than
    its header says (a truncated download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError("not a safetensors file: shorter than its 8-byte header length", where=str(path))
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"corrupt or truncated safetensors file: header length {header_len} does not fit in "
                    f"{size} bytes", where=str(path), fix="download or write the file again")
            raw = handle.read(header_len)
    except OSError as error:
        raise CheckpointError(f"cannot read weight file: {error.strerror}", where=str(path)) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("corrupt safetensors file: its header is not valid JSON", where=str(path),
                              fix="download or write the file again") from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors file: its header is not a JSON object", where=str(path))
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors header entry for tensor {name!r}", where=str(path)) from None
        bits = element_bits(dtype_name)
        if bits is None or end - begin != (math.prod(shape) * bits + 7) // 8 or begin < 0:
            raise CheckpointError(
                f"corrupt safetensors header: tensor {name!r} ({dtype_name}, shape {list(shape)}) has "
                f"byte range [{begin}, {end})", where=str(path), fix="download or write the file again")
        if data_start + end > size:
            raise CheckpointError(
                f"truncated safetensors file: tensor {name!r} ends at byte {data_start + end} but the file "
                f"has {size} bytes", where=str(path), fix="download or write the file again")
        tensors[name] = TensorInfo(name, shape, dtype_name, path, data_start + begin, data_start + end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_tensor(info: TensorInfo) -> "torch.Tensor":
    """Read one tensor's bytes with positioned reads into a new tensor (no mmap, no pickle)."""
    return read_elements(info, 0, info.numel).reshape(info.shape)


def read_elements(info: TensorInfo, start: int, count: int) -> "torch.Tensor":
    """Elements ``start .. start + count`` of the flattened tensor, read from disk now into a new 1-D tensor."""
    import torch

    out = torch.empty(count, dtype=info.dtype)
    nbytes = count * out.element_size()
    if nbytes == 0:
        return out
    buffer = memoryview(out.view(torch.uint8).numpy()).cast("B")
    begin = info.begin + start * out.element_size()
    if start < 0 or begin + nbytes > info.end:
        raise CheckpointError(f"elements [{start}, {start + count}) are outside tensor {info.name!r}",
                              where=str(info.file))
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [buffer[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"unexpected end of file while reading tensor {info.name!r}",
                                      where=str(info.file))
            done += got
    finally:
        os.close(fd)
    return out


def map_tensor(info: TensorInfo) -> "torch.Tensor":
    """The tensor's bytes in its file, mapped (private, copy-on-write) instead of copied: only this tensor's
    pages, and only while the tensor is alive."""
    import mmap

    import torch

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
    with open(info.file, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), info.end - start, offset=start, access=mmap.ACCESS_COPY)
    view = memoryview(mapping)[info.begin - start:]
    return torch.frombuffer(view, dtype=info.dtype).reshape(info.shape)


def refuse_pickle(path: Path, files: Sequence[Path]) -> None:
    """Raise :class:`UnsafeWeightsError` for pickle weight files, with how to convert them."""
    names = ", ".join(sorted(f.name for f in files)[:3])
    raise UnsafeWeightsError(
        f"refusing to load pickle weights ({names}): unpickling can run arbitrary code",
        where=str(path),
        fix=("convert them once, in a trusted environment, to safetensors: load the model with transformers "
             "and call save_pretrained (which writes safetensors), or for a bare state dict run "
             "`safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'model.safetensors')`"),
    )


@dataclass
class Checkpoint:
    """A lazily read set of safetensors files: a model folder, an adapter folder or one file."""

    path: Path
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)
    index_file: Path | None = None

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint", where=str(self.path)) from None

    def read(self, name: str) -> "torch.Tensor":
        """The tensor ``name``, read from disk now into memory the caller owns."""
        return read_tensor(self.info(name))

    def map(self, name: str) -> "torch.Tensor":
        """The tensor ``name`` as a copy-on-write view of its file (see the module docstring)."""
        return map_tensor(self.info(name))

    def parameter_count(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def read_json(self, filename: str) -> dict | None:
        """A JSON file beside the weights (``config.json``, ``adapter_config.json``), or None if absent."""
        candidate = self.folder / filename
        if not candidate.is_file():
            return None
        try:
            return json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot parse {filename}: {error}", where=str(candidate)) from None

    @property
    def is_adapter(self) -> bool:
        return (self.folder / "adapter_config.json").is_file()


def weight_files_of_folder(folder: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of a folder, following an index when one exists."""
    for stem in ("model", "adapter_model"):
        index = folder / f"{stem}{SAFETENSORS_INDEX_SUFFIX}"
        if index.is_file():
            return _files_from_index(index), index
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single], None
    indexes = sorted(folder.glob(f"*{SAFETENSORS_INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return _files_from_index(indexes[0]), indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, None
    pickles = [f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES or f.name.endswith(".bin.index.json")]
    if pickles:
        refuse_pickle(folder, pickles)
    raise CheckpointError("no safetensors weights found", where=str(folder),
                          fix="point at a Hugging Face model or PEFT adapter folder that has *.safetensors files")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot parse the shard index: {error}", where=str(index)) from None
    files = []
    for filename in sorted(set(weight_map.values())):
        shard = index.parent / filename
        if not shard.is_file():
            raise CheckpointError(f"shard {filename} named in the index is missing", where=str(index),
                                  fix="download the missing shard or the whole folder again")
        files.append(shard)
    return files


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a model folder, an adapter folder or a single ``.safetensors`` file for lazy reading."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or folder", where=str(path), fix="check the path")
    index_file = None
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path, [path])
        files = [path]
    else:
        files, index_file = weight_files_of_folder(path)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        file_tensors, file_metadata = read_safetensors_header(file)
        for name in file_tensors:
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards ({tensors[name].file.name}, "
                                      f"{file.name})", where=str(path))
        tensors.update(file_tensors)
        metadata = metadata or file_metadata
    if index_file is not None:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{len(missing)} tensors named in the index are not in the shards, e.g. "
                                  f"{missing[0]!r}", where=str(index_file))
    return Checkpoint(path=path, tensors=tensors, weight_files=files, metadata=metadata, index_file=index_file)
