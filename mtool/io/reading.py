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

import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from mtool.errors import CheckpointError, UnsafeWeightsError, shown
from mtool.io.dtypes import dtype_from_safetensors
from mtool.io.header import REWRITE, header_length, parse_header
from mtool.io.jsonfiles import read_json_object

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
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
    unreadable or breaks a rule of :mod:`mtool.io.header` (offsets that overlap, leave gaps or do not match the
    shape and dtype, an unknown dtype, negative sizes, metadata that is not a string map), or the file is shorter
    than its header says (a truncated download).
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a pipe or a device would block or never end
            raise CheckpointError("not a regular file", where=str(path), fix="point at a .safetensors file")
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header_len = header_length(handle.read(8), size, where=str(path))
            raw = handle.read(header_len)
    except OSError as error:
        raise CheckpointError(f"cannot read weight file: {error.strerror or type(error).__name__}", where=str(path),
                              fix="check the path and its permissions") from None
    entries, metadata = parse_header(raw, size - 8 - header_len, where=str(path))
    data_start = 8 + header_len
    tensors = {entry.name: TensorInfo(entry.name, entry.shape, entry.dtype_name, path, data_start + entry.begin,
                                      data_start + entry.end) for entry in entries}
    return tensors, metadata


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
        raise CheckpointError(f"elements [{start}, {start + count}) are outside tensor {shown(info.name)}",
                              where=str(info.file))
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [buffer[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"the file ended while reading tensor {shown(info.name)} (it was truncated "
                                      "after it was opened)", where=str(info.file), fix=REWRITE)
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
            raise CheckpointError(f"tensor {shown(name)} is not in the checkpoint", where=str(self.path),
                                  fix="check that the model has the expected architecture") from None

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
        """A JSON object beside the weights (``config.json``, ``adapter_config.json``), or None if absent."""
        candidate = self.folder / filename
        if not candidate.is_file():
            return None
        return read_json_object(candidate, what=filename)

    @property
    def is_adapter(self) -> bool:
        return (self.folder / "adapter_config.json").is_file()


def weight_files_of_folder(folder: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of a folder, following an index when one exists."""
    files, index, _ = _weight_files(folder)
    return files, index


def _weight_files(folder: Path) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    """The safetensors files of a folder, its index and the index's weight map (None without an index)."""
    for stem in ("model", "adapter_model"):
        index = folder / f"{stem}{SAFETENSORS_INDEX_SUFFIX}"
        if index.is_file():
            return _files_from_index(index)
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single], None, None
    indexes = sorted(folder.glob(f"*{SAFETENSORS_INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return _files_from_index(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, None, None
    pickles = [f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES or f.name.endswith(".bin.index.json")]
    if pickles:
        refuse_pickle(folder, pickles)
    raise CheckpointError("no safetensors weights found", where=str(folder),
                          fix="point at a Hugging Face model or PEFT adapter folder that has *.safetensors files")


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (tensor name -> shard file), every file checked to be a
    ``.safetensors`` file named relative to the index's folder and staying inside it."""
    data = read_json_object(index, what="shard index")
    weight_map = data.get("weight_map")
    fix = "restore the index from where the model came from"
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"the shard index's weight_map must map tensor names to file names, got "
                              f"{shown(weight_map, 80)}", where=str(index), fix=fix)
    for filename in set(weight_map.values()):
        problem = shard_name_problem(filename)
        if problem:
            raise CheckpointError(f"the shard index names the file {shown(filename, 80)}, which {problem}",
                                  where=str(index), fix=fix)
    return weight_map


def shard_name_problem(filename: str) -> str | None:
    """Why ``filename`` cannot be a shard of the index's folder (None when it can): shards are ``.safetensors``
    files named relative to the folder, never outside it (no absolute path, no ``..``)."""
    parts = PurePosixPath(filename).parts
    if not filename or "\0" in filename or "\\" in filename:
        return "is not a file name"
    if PurePosixPath(filename).is_absolute() or ".." in parts:
        return "lies outside the model folder"
    if not filename.endswith(".safetensors"):
        return "is not a .safetensors file"
    return None


def _files_from_index(index: Path) -> tuple[list[Path], Path, dict[str, str]]:
    weight_map = read_weight_map(index)
    files = []
    for filename in sorted(set(weight_map.values())):
        shard = index.parent / filename
        if not shard.is_file():
            raise CheckpointError(f"shard {shown(filename, 80)} named in the index is missing", where=str(index),
                                  fix="download the missing shard or the whole folder again")
        files.append(shard)
    if not files:
        raise CheckpointError("the shard index lists no tensors", where=str(index),
                              fix="restore the index from where the model came from")
    return files, index, weight_map


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a model folder, an adapter folder or a single ``.safetensors`` file for lazy reading."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or folder", where=str(path), fix="check the path")
    index_file = weight_map = None
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path, [path])
        files = [path]
    elif path.is_dir():
        files, index_file, weight_map = _weight_files(path)
    else:
        raise CheckpointError("not a file or a folder (a device, a pipe or a socket)", where=str(path),
                              fix="point at a model folder or a .safetensors file")
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        file_tensors, file_metadata = read_safetensors_header(file)
        for name in file_tensors:
            if name in tensors:
                raise CheckpointError(f"tensor {shown(name)} appears in two shards ({tensors[name].file.name}, "
                                      f"{file.name})", where=str(path), fix="download or write the folder again")
        tensors.update(file_tensors)
        metadata = metadata or file_metadata
    if weight_map is not None:
        _check_index(weight_map, tensors, index_file)
    return Checkpoint(path=path, tensors=tensors, weight_files=files, metadata=metadata, index_file=index_file)


def _check_index(weight_map: dict[str, str], tensors: dict[str, TensorInfo], index: Path) -> None:
    """Every tensor the index names is in the shard it names."""
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{len(missing)} tensors named in the index are not in the shards, e.g. "
                              f"{shown(missing[0])}", where=str(index), fix="download the folder again")
    for name, filename in weight_map.items():
        actual = tensors[name].file
        if actual != index.parent / filename:
            raise CheckpointError(f"the index puts tensor {shown(name)} in {shown(filename, 80)} but it is in "
                                  f"{actual.name}", where=str(index), fix="restore the index from where the model "
                                                                          "came from")
