"""``mtool export gguf``: a model folder (or a LoRA adapter, merged into its base first) to GGUF files, streamed.

The steps, all on the inputs' headers and small files until the stream starts:

1. the source: a model folder or Hub id as is; an adapter is merged into its base by ``mtool adapters merge``
   (streamed) into a hidden folder of the output, removed once the GGUF files are written;
2. the family and hyperparameters (:mod:`.gguf_architectures`), refused where llama.cpp would compute something
   else; the tokenizer (:mod:`.gguf_vocab`); the tensors (:mod:`.gguf_tensors`); the identity (:mod:`.gguf_metadata`);
3. per file type: gguf-py's ``GGUFWriter`` is given every key and tensor, then the tensor data streams through
   :func:`mtool.stream.stream_tensors` (workers read, convert and quantize blocks of rows ahead; the writer thread
   puts them in place, :mod:`.gguf_file`), so memory stays at a few blocks whatever the model's size;
4. the output folder ends like every mtool output (:func:`mtool.naming.finish.finish_output`): the sha256 of each
   GGUF file (computed while it was written) in the lineage record, then the model card, which lists the files
   and how to run them.

The output is a folder (``<Name>-GGUF``: the Hub's convention for a repository of GGUF files) holding
``<Name>-<TYPE>.gguf`` per type, an Ollama ``Modelfile`` (the Q8_0 file, else the first, with the chat template as
Ollama's template: :mod:`mtool.modelfile`), ``mtool-lineage.json`` and ``README.md``, built beside its target and
renamed into place, so an interrupted export leaves nothing and ``mtool push`` can publish it as it is.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from mtool import ui
from mtool.errors import InputError
from mtool.export.gguf_architectures import ModelConfig, add_hyperparameters, check_exportable, read_model_config
from mtool.export.gguf_file import GGUFFileWriter
from mtool.export.gguf_metadata import ExportIdentity, add_general, export_identity
from mtool.export.gguf_tensors import TOKEN_EMBEDDING, Job, PlannedTensor, encode_job, jobs_for, plan_tensors
from mtool.export.gguf_types import GGUFType, parse_types
from mtool.export.gguf_vocab import Vocabulary, add_vocabulary, read_vocabulary
from mtool.hub import ModelRef, resolve_model
from mtool.io.folders import atomic_output_dir
from mtool.io.hashing import FileHasher
from mtool.io.reading import open_checkpoint
from mtool.lineage import Lineage, Parent, ParentInput, declared_license, describe_parents_in_background, read_lineage
from mtool.modelfile import MODELFILE, modelfile
from mtool.naming.card import write_card
from mtool.naming.finish import finish_output
from mtool.runtime import REUSE_FREED_BUFFERS
from mtool.stream import Stream, StreamLimits, stream_tensors

# Four blocks of rows prepared ahead by two workers, 160 MiB at most. gguf-py's quantizers make several block-sized
# temporaries per block: served again from the heap rather than mapped afresh they quantize ~30% faster (measured).
EXPORT_LIMITS = StreamLimits(lookahead=4, lookahead_bytes=160 * 2**20, allocator=REUSE_FREED_BUFFERS)
_FLOAT_DTYPES = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
MERGED_SOURCE = ".merged-model"  # where an adapter is merged into its base, inside the staging folder


@dataclass(frozen=True)
class GGUFExportOptions:
    """What to write: file types (``f16``, ``q8_0``, ...), the model's name, an adapter's base, shard size."""

    types: tuple[str, ...] = ("f16",)
    name: str | None = None
    base: str | None = None
    max_shard_bytes: int | None = None
    tokenizer_pre: str | None = None
    force: bool = False


@dataclass(frozen=True)
class GGUFExportReport:
    output: Path
    files: dict[str, str]  # file name -> type
    seconds: float
    tensors: int
    name: str
    notes: list[str] = field(default_factory=list)


@dataclass
class _Source:
    """The model the GGUF is made from: its folder, how the user named it, and its record entry."""

    folder: Path
    ref: ModelRef | None
    parent: Parent | None = None


def _merged_adapter(adapter: ModelRef, base: str | None, staging: Path, hasher: FileHasher) -> _Source:
    """Merge ``adapter`` into its base inside ``staging`` (``mtool adapters merge``) and describe the result."""
    from mtool.adapters.merge import merge_adapters

    config = open_checkpoint(adapter.path).read_json("adapter_config.json") or {}
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise InputError("the adapter does not name its base model", where=str(adapter.path),
                         fix="pass --base with the base model it was trained on")
    folder = staging / MERGED_SOURCE
    ui.info(f"merging the adapter into {base} first")
    with ui.quiet_unless_verbose():
        merge_adapters(str(base), [str(adapter.path)], folder, hasher=hasher)
    record = read_lineage(folder)
    assert record is not None
    base_id = next((p.id for p in record.parents if p.role == "base"), str(base))
    parent = Parent(id=f"{base_id}+{adapter.id}", role="model", files=dict(record.outputs),
                    license=declared_license(folder), lineage=record)
    return _Source(folder, None, parent)


def _declare(writer: gguf.GGUFWriter, jobs: list[Job]) -> None:
    """Every tensor's name, shape, encoding and size, in order (gguf-py lays the file out from them)."""
    sizes: dict[str, int] = {}
    first: dict[str, Job] = {}
    for job in jobs:
        sizes[job.tensor.name] = sizes.get(job.tensor.name, 0) + job.nbytes
        first.setdefault(job.tensor.name, job)
    for name, job in first.items():
        shape, encoding = job.tensor.shape, job.encoding
        if encoding in _FLOAT_DTYPES:
            writer.add_tensor_info(name, shape, np.dtype(_FLOAT_DTYPES[encoding]), sizes[name])
        else:
            writer.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, encoding), np.dtype(np.uint8),
                                   sizes[name], raw_dtype=encoding)


def write_modelfile(folder: Path, files: dict[str, str], vocabulary: Vocabulary) -> Path:
    """The Ollama Modelfile of the Q8_0 file (else the first; a split file by its first shard)."""
    runnable = [name for name in files if "-of-" not in name or "-00001-of-" in name]
    chosen = next((name for name in runnable if files[name] == "Q8_0"), runnable[0])
    path = folder / MODELFILE
    path.write_text(modelfile(chosen, vocabulary.chat_template, vocabulary.eos_text), encoding="utf-8")
    return path


def write_gguf(path: Path, file_type: GGUFType, config: ModelConfig, vocabulary: Vocabulary,
               identity: ExportIdentity, tensors: list[PlannedTensor], *,
               max_shard_bytes: int | None = None) -> dict[str, str]:
    """Write one GGUF file (or its shards) at ``path``; returns ``{file name: sha256}`` of those hashed on the way
    (all of them, when the stream wrote in order)."""
    writer = gguf.GGUFWriter(None, config.family.arch_name, split_max_size=max_shard_bytes or 0)
    add_general(writer, identity, file_type.file_type)
    add_hyperparameters(writer, config)
    add_vocabulary(writer, vocabulary)
    jobs = list(jobs_for(tensors, file_type, config.head_dim))
    _declare(writer, jobs)
    stream = Stream(jobs=jobs, name=lambda job: job.tensor.name, prepare=lambda job: encode_job(job, config),
                    produce=lambda job, encoded: [(job.byte_offset, encoded)], held_bytes=lambda job: job.held_bytes)
    with GGUFFileWriter(writer, path) as out:
        stream_tensors(stream, out, limits=EXPORT_LIMITS, description=f"export {file_type.name}")
    return out.digests


def export_gguf(model: str, output: str | os.PathLike, options: GGUFExportOptions = GGUFExportOptions(), *,
                hasher: FileHasher | None = None) -> GGUFExportReport:
    """Export ``model`` (a folder, Hub id or adapter) to GGUF files in the folder ``output`` (module docstring)."""
    started = time.perf_counter()
    hasher = hasher or FileHasher.default()
    file_types = parse_types(options.types)
    ref = resolve_model(model)
    is_adapter = open_checkpoint(ref.path).is_adapter
    inputs = [ref.path] + ([Path(options.base)] if options.base and Path(options.base).exists() else [])
    with atomic_output_dir(output, force=options.force, inputs=inputs) as staging:
        if is_adapter:
            source = _merged_adapter(ref, options.base, staging, hasher)
            parents = None
        else:
            if options.base:
                raise InputError("--base is for an adapter, and MODEL is a full model", where="--base",
                                 fix="drop --base")
            source = _Source(ref.path if ref.path.is_dir() else ref.path.parent, ref)
            parents = describe_parents_in_background([ParentInput(ref, "model")], hasher)
        config = read_model_config(source.folder)
        check_exportable(config)
        checkpoint = open_checkpoint(source.folder)
        tensors = plan_tensors(checkpoint, config)
        rows = next(t.shape[0] for t in tensors if t.name == TOKEN_EMBEDDING)
        vocabulary = read_vocabulary(source.folder, rows, pre=options.tokenizer_pre)
        given = ref.id.rpartition("/")[2] if ref.is_hub else (ref.path if ref.path.is_dir() else ref.path.parent).name
        identity = export_identity(source.folder, source.ref, name=options.name, given=given, adapter=is_adapter,
                                   parameters=checkpoint.parameter_count())
        files: dict[str, str] = {}
        digests: dict[str, str] = {}
        for file_type in file_types:
            path = staging / identity.filename(file_type.name)
            digests.update(write_gguf(path, file_type, config, vocabulary, identity, tensors,
                                      max_shard_bytes=options.max_shard_bytes))
            for file in sorted(staging.glob(f"{path.stem}*.gguf")):
                files[file.name] = file_type.name
        write_modelfile(staging, files, vocabulary)
        parameter_count = checkpoint.parameter_count()
        if is_adapter:
            shutil.rmtree(source.folder)
        record = Lineage(
            operation="export", method="gguf",
            parents=[source.parent] if source.parent is not None else parents.result(),
            parameters={"format": "gguf", "architecture": config.family.arch_name,
                        "types": [t.name for t in file_types], "files": files,
                        "tokenizer": vocabulary.description, "shard_size": options.max_shard_bytes,
                        "gguf_py": _gguf_version()},
            parameter_count=parameter_count,
        )
        finish_output(staging, record, hasher=hasher, digests=digests, card=False)
        card_name = f"{identity.name.format()}-GGUF" if identity.name is not None else None
        write_card(staging, name=card_name)
    seconds = time.perf_counter() - started
    ui.info(f"wrote {output}: {', '.join(files)} in {seconds:.1f} s")
    return GGUFExportReport(Path(output), files, seconds, len(tensors), identity.stem, vocabulary.notes)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"
