"""Hugging Face model folders on disk: lazy reading, streaming writing, atomic output folders.

Reading
    :func:`open_checkpoint` opens a model folder (single ``model.safetensors`` or sharded with
    ``model.safetensors.index.json``), a PEFT adapter folder (``adapter_model.safetensors``) or a single
    ``.safetensors`` file. Names, shapes and dtypes come from the safetensors headers alone; a tensor's
    bytes are read only when :meth:`Checkpoint.read` asks for it, with one positioned read (``pread``)
    straight into a fresh tensor. (Reading through ``mmap`` would be zero-copy too, but every page it
    touches stays in the process's resident set until the mapping goes; a positioned read keeps the
    resident memory of a whole-model pass at one tensor.) Pickle weights (``.bin``, ``.pt``) are refused:
    unpickling runs arbitrary code.

Writing
    :class:`CheckpointWriter` is told every output tensor (name, shape, dtype) up front, so it lays out
    the shards, writes each shard's safetensors header first, and then puts every tensor straight into
    its place as it is produced, in any order: no shard is ever buffered in memory. A single-shard
    output is byte-for-byte what ``safetensors.torch.save_file`` writes for the same tensors.

Output folders
    :func:`atomic_output_dir` builds the output in a hidden sibling folder and renames it into place only
    when everything succeeded: an interrupted run leaves the target as it was, an existing target is
    replaced only with ``force``, and a target that is (or contains) an input is always refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.errors import CheckpointError, InputError, OutputExistsError, UnsafeWeightsError

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1000**3  # 5GB, the Hub's usual shard size
PENDING_HASH_BYTES = 64 * 2**20  # written bytes waiting to be hashed, at most (one larger buffer waits alone)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Files that travel with the weights: model config, generation defaults, tokenizer, chat template.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# safetensors dtype names, in the order of safetensors' own Dtype enum (its writer sorts tensors by
# this rank, largest first, then by name; the writer here does the same so its files are identical).
_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPE_ORDER)}


def _torch_dtypes() -> dict[str, "torch.dtype"]:
    import torch

    table = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "C64": torch.complex64,
    }
    for name, attribute in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"), ("U16", "uint16"),
                            ("U32", "uint32"), ("U64", "uint64")):  # fmt: skip
        if hasattr(torch, attribute):
            table[name] = getattr(torch, attribute)
    return table


def dtype_from_safetensors(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return _torch_dtypes()[name]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name!r}") from None


def dtype_to_safetensors(dtype: "torch.dtype") -> str:
    """The safetensors dtype string of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    for name, candidate in _torch_dtypes().items():
        if candidate == dtype:
            return name
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")


def parse_dtype(name: str) -> "torch.dtype":
    """A dtype from a user's spelling: ``bfloat16``/``bf16``, ``float16``/``fp16``/``half``, ``float32``..."""
    import torch

    spellings = {
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "float64": torch.float64, "fp64": torch.float64,
    }  # fmt: skip
    key = str(name).lower().removeprefix("torch.")
    if key not in spellings:
        raise InputError(f"unknown dtype {name!r}", fix="use one of bfloat16, float16, float32, float64")
    return spellings[key]


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


_ELEMENT_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}  # fmt: skip


def _element_bits(dtype_name: str) -> int:
    return _ELEMENT_BITS[dtype_name]


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
        expected = (math.prod(shape) * _ELEMENT_BITS.get(dtype_name, 0) + 7) // 8
        if dtype_name not in _ELEMENT_BITS or end - begin != expected or begin < 0:
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
        raise CheckpointError(f"elements [{start}, {start + count}) are outside tensor {info.name!r}", where=str(info.file))
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [buffer[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"unexpected end of file while reading tensor {info.name!r}", where=str(info.file))
            done += got
    finally:
        os.close(fd)
    return out


def _refuse_pickle(path: Path, files: Sequence[Path]) -> None:
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
        """The tensor ``name``, read from disk now (one tensor's memory, nothing else)."""
        return read_tensor(self.info(name))

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
        _refuse_pickle(folder, pickles)
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
            _refuse_pickle(path, [path])
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


# ---------------------------------------------------------------------------------------------------
# Writing


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
        return (self.numel * _element_bits(self.dtype_name) + 7) // 8


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


def _safetensors_layout(specs: Sequence[TensorSpec], metadata: dict[str, str],
                        keep_order: bool = False) -> tuple[bytes, dict[str, int]]:
    """The header bytes of one shard and each tensor's offset relative to the data start.

    By default the same layout as safetensors' own writer: tensors sorted by dtype rank (descending) then
    name, packed without gaps; compact JSON with ``__metadata__`` first; header padded with spaces to a
    multiple of 8 bytes. ``keep_order`` lays the tensors out in the announced order instead.
    """
    ordered = list(specs) if keep_order else sorted(specs, key=lambda s: (-_DTYPE_RANK[s.dtype_name], s.name))
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


class CheckpointWriter:
    """Streams announced tensors straight into their places in safetensors shards.

    ``specs`` lists every output tensor in the order shards are filled. Headers are written when the
    writer opens; :meth:`write` puts one tensor at its offset (any order, each exactly once);
    :meth:`close` checks that every tensor arrived and writes ``<stem>.safetensors.index.json`` when
    there is more than one shard. Shards are named like transformers names them:
    ``model.safetensors`` or ``model-00001-of-00003.safetensors``.

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
        self._hashing = _BackgroundHashing(self._hashers)
        for number, group in enumerate(groups, start=1):
            filename = f"{file_stem}.safetensors" if count == 1 else f"{file_stem}-{number:05d}-of-{count:05d}.safetensors"
            shard = _Shard(self.folder / filename, list(group))
            header, relative = _safetensors_layout(group, self.metadata, keep_order=in_order)
            shard.offsets = {name: len(header) + offset for name, offset in relative.items()}
            shard.size = len(header) + sum(spec.nbytes for spec in group)
            fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, shard.size)
            self._hashers.append(hashlib.sha256(header) if in_order else None)
            self._hashed_to.append(len(header))
            for spec in group:
                self._where[spec.name] = (len(self._shards), spec)
            self._shards.append(shard)

    @property
    def files(self) -> list[Path]:
        return [shard.path for shard in self._shards]

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
            _pwrite_all(self._fds[shard_number], data, offset)
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

    def _close_fds(self) -> None:
        self._hashing.finish()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_fds()


class _BackgroundHashing:
    """Feeds each shard's hasher, in file order, from a thread of its own: hashing the output overlaps
    writing it (hashlib releases the GIL on large buffers). Fed buffers must not change afterwards; at most
    ``PENDING_HASH_BYTES`` wait (a larger buffer waits alone, so one large tensor may outlive its write).

    A shard whose hashing failed, or that is fed after :meth:`finish`, loses its hasher (set to None): it gets
    no digest from the writer and is hashed from disk instead. Nothing here blocks after :meth:`finish`.
    """

    def __init__(self, hashers: list["hashlib._Hash | None"]) -> None:
        self.hashers = hashers
        self._pending: deque[tuple[int, memoryview]] = deque()
        self._pending_bytes = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def feed(self, shard: int, data: memoryview) -> None:
        with self._changed:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="mtool-hash", daemon=True)
                self._thread.start()
            self._changed.wait_for(lambda: self._stopping or not self._pending
                                   or self._pending_bytes + len(data) <= PENDING_HASH_BYTES)
            if self._stopping:
                self.hashers[shard] = None
                return
            self._pending.append((shard, data))
            self._pending_bytes += len(data)
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending) or self._stopping)
                if not self._pending:
                    return
                shard, data = self._pending[0]
            hasher = self.hashers[shard]
            if hasher is not None:
                try:
                    hasher.update(data)
                except BaseException:  # noqa: BLE001 - that shard is hashed from disk instead
                    self.hashers[shard] = None
            with self._changed:
                self._pending.popleft()
                self._pending_bytes -= len(data)
                self._changed.notify_all()

    def finish(self) -> None:
        """Wait until everything fed is hashed and stop the thread (a later feed only drops its shard's hash)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


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


# ---------------------------------------------------------------------------------------------------
# Output folders


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_target(target: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse a target that exists (unless ``force``) or that is, contains or lies inside an input."""
    target = Path(target).resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if _is_within(source_path, target) or _is_within(target, source_path):
            raise OutputExistsError(f"the output {target} would overwrite the input {source_path}",
                                    fix="choose an output folder outside every input")
    if target.exists() and not force:
        raise OutputExistsError(f"the output {target} already exists", fix="choose another path or pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"the output {target} exists and is not a folder", fix="choose another path")
    return target


def _current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (another thread may be creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, force: bool = False,
                      inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target`` in one rename.

    On any exception (Ctrl-C included) the temporary folder is removed and ``target`` is untouched.
    With ``force`` an existing ``target`` is replaced, but only after the new one is complete.
    """
    target = check_output_target(target, force=force, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it private (0700); an output gets the usual mode
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        if not force:  # appeared while we were working
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputExistsError(f"the output {target} appeared while mtool was writing it",
                                    fix="pass --force to replace it")
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, retired / target.name)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, target)


def copy_support_files(source: str | os.PathLike, destination: str | os.PathLike, *,
                       config: bool = True, tokenizer: bool = True) -> list[str]:
    """Copy config/generation config and/or tokenizer + chat template files that exist in ``source``."""
    source, destination = Path(source), Path(destination)
    if source.is_file():
        source = source.parent
    wanted = (CONFIG_FILES if config else ()) + (TOKENIZER_FILES if tokenizer else ())
    copied = []
    for filename in wanted:
        if (source / filename).is_file():
            shutil.copyfile(source / filename, destination / filename)
            copied.append(filename)
    return copied


# ---------------------------------------------------------------------------------------------------
# Hashing


def file_sha256(path: str | os.PathLike, *, chunk_bytes: int = 16 * 1024 * 1024) -> str:
    """The sha256 hex digest of a file, streamed in chunks (a file's memory is never held at once).

    A file in the Hugging Face cache whose blob is named by its sha256 (every LFS file) is not re-read.
    Digests of large files are remembered by (path, size, mtime) in ``$MTOOL_CACHE_DIR`` (default
    ``~/.cache/mtool``) so a model is hashed once, not on every merge. A file that another thread of this
    process is hashing already (see :func:`hash_in_background`) is waited for, not read a second time.
    """
    path = Path(path)
    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    remembered = stat.st_size >= _HashCache.MIN_BYTES
    with _HASHING_LOCK:
        if key in _HASHED:
            return _HASHED[key]
        running = _HASHING.get(key)
        owner = running is None
        if owner:
            running = _HASHING[key] = Future()
    if not owner:
        return running.result()
    try:
        result = _cached_or_computed_sha256(real, key, remembered, chunk_bytes)
    except BaseException as error:
        with _HASHING_LOCK:
            del _HASHING[key]
        running.set_exception(error)
        raise
    with _HASHING_LOCK:
        del _HASHING[key]
        if remembered:  # kept in this process too, whether or not the cache file could be written
            _HASHED[key] = result
    running.set_result(result)
    return result


def hash_in_background(files: Sequence[str | os.PathLike]) -> threading.Thread:
    """Start hashing ``files`` in a daemon thread, so that a later :func:`file_sha256` of each finds its digest
    computed or in progress (e.g. while the rest of the program starts up). Errors are left for that later call
    to raise."""

    def run() -> None:
        for file in files:
            with contextlib.suppress(Exception):  # the later call raises it where it can be reported
                file_sha256(file)

    thread = threading.Thread(target=run, name="mtool-prehash", daemon=True)
    thread.start()
    return thread


_HASHING: dict[str, "Future[str]"] = {}  # digests being computed now, by (path, size, mtime) key
_HASHED: dict[str, str] = {}  # digests of large files computed by this process, by the same key
_HASHING_LOCK = threading.Lock()
_CACHE_LOCK = threading.Lock()  # one read-modify-write of the digest cache file at a time


def _cached_or_computed_sha256(real: Path, key: str, remembered: bool, chunk_bytes: int) -> str:
    if remembered:
        with _CACHE_LOCK:
            cached = _HashCache.load().entries.get(key)
        if cached is not None:
            return cached
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(chunk_bytes))  # one buffer for the whole file: no fresh pages per chunk
    with open(real, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(buffer[:count])
    result = digest.hexdigest()
    if remembered:
        with _CACHE_LOCK:
            cache = _HashCache.load()
            cache.entries[key] = result
            cache.save()
    return result


@dataclass
class _HashCache:
    path: Path
    entries: dict[str, str]

    MIN_BYTES = 64 * 1024 * 1024

    @classmethod
    def load(cls) -> "_HashCache | None":
        folder = Path(os.environ.get("MTOOL_CACHE_DIR", Path.home() / ".cache" / "mtool"))
        path = folder / "sha256.json"
        try:
            entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def save(self) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(temporary, self.path)


# ---------------------------------------------------------------------------------------------------
# Model references


@dataclass(frozen=True)
class ModelRef:
    """A model named by a user: a local folder or a Hub id, with an optional revision."""

    id: str
    path: Path
    revision: str | None = None
    is_hub: bool = False


def resolve_model(reference: str, revision: str | None = None, *, download: bool | None = None) -> ModelRef:
    """Find a model: a local path first, then the Hugging Face cache, then (when allowed) the Hub.

    ``download`` defaults to "yes unless ``HF_HUB_OFFLINE`` is set". Only safetensors weights, JSON
    files and tokenizer files are fetched.
    """
    local = Path(reference).expanduser()
    if local.exists():
        return ModelRef(id=str(local), path=local, revision=revision, is_hub=False)
    if reference.count("/") != 1 or reference.startswith((".", "/", "~")):
        raise InputError("model not found", where=reference, fix="give an existing folder or a Hub id like owner/name")
    if download is None:
        download = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
    try:
        folder = snapshot_download(reference, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        folder = None
    if folder is None and download:
        try:
            folder = snapshot_download(reference, revision=revision, allow_patterns=patterns)
        except Exception as error:  # noqa: BLE001
            raise InputError(f"cannot download the model: {error}", where=reference,
                             fix="check the id and your network, or download it and pass the folder") from None
    if folder is None:
        raise InputError("model is neither a local folder nor in the Hugging Face cache", where=reference,
                         fix="download it first (`hf download ID`) or pass a local folder")
    return ModelRef(id=reference, path=Path(folder), revision=revision, is_hub=True)
