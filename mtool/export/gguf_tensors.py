"""Which GGUF tensors a checkpoint becomes, and how each is computed, a block of rows at a time.

Names come from gguf-py's ``TensorNameMap`` for the family's architecture (``model.layers.3.self_attn.q_proj.weight``
-> ``blk.3.attn_q.weight``); a tensor it cannot name is an error, as llama.cpp refuses files with tensors it does
not expect. Skipped: rotary ``inv_freq`` buffers, the vision tower of a multimodal Gemma 3, and the head of Gemma /
Gemma 2 (the embedding serves as the head: a head that differs from it is refused). Llama 3 RoPE scaling adds the
generated ``rope_freqs.weight``.

Each tensor is cut into jobs of whole rows, about :data:`BLOCK_ELEMENTS` values each (for a permuted projection,
whole heads): a job reads its rows from disk, converts them to float32, applies the family's change (the Llama Q/K
row permutation, the Gemma ``+ 1``), and encodes them with gguf-py's quantizer. Memory is a few blocks, not a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import gguf
import numpy as np

from mtool.errors import InputError
from mtool.export.gguf_architectures import ModelConfig, llama3_rope_factors
from mtool.export.gguf_types import GGUFType, encoded_nbytes, tensor_encoding
from mtool.io.reading import Checkpoint, TensorInfo, read_elements

if TYPE_CHECKING:
    import torch

BLOCK_ELEMENTS = 1 << 20  # values per job: 4 MiB in float32, the merge's chunks (larger: no faster, more memory)
EMBEDDING = "model.embed_tokens.weight"
TOKEN_EMBEDDING = "token_embd.weight"  # its GGUF name: one row per token of the vocabulary
HEAD = "lm_head.weight"
_SKIPPED = re.compile(r"(rotary_emb\.inv_freq|vision_tower|multi_modal_projector|vision_model)")
_LANGUAGE_MODEL = (("model.language_model.", "model."), ("language_model.model.", "model."),
                   ("language_model.lm_head.", "lm_head."))


class Change(Enum):
    """What a tensor needs on its way from transformers to llama.cpp."""

    NONE = "none"
    PERMUTE = "permute"  # Llama/Mistral q_proj, k_proj: llama.cpp rotates adjacent pairs
    PLUS_ONE = "plus one"  # Gemma norms: transformers computes x * (1 + w)


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, where it comes from, its shape (row-major, as in torch), its change."""

    name: str
    source: TensorInfo | None
    shape: tuple[int, ...]
    change: Change = Change.NONE
    values: np.ndarray | None = None  # a generated tensor's values

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def row_length(self) -> int:
        return self.shape[-1]


def _hf_name(name: str) -> str:
    for prefix, replacement in _LANGUAGE_MODEL:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


def _same_values(first: TensorInfo, second: TensorInfo) -> bool:
    if first.shape != second.shape or first.dtype_name != second.dtype_name:
        return False
    for start in range(0, first.numel, BLOCK_ELEMENTS):
        count = min(BLOCK_ELEMENTS, first.numel - start)
        if not read_elements(first, start, count).equal(read_elements(second, start, count)):
            return False
    return True


def plan_tensors(checkpoint: Checkpoint, config: ModelConfig) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in llama.cpp's usual order (embedding, blocks by number, output), with its change."""
    family = config.family
    name_map = gguf.get_tensor_name_map(family.arch, config.layers)
    sources = {_hf_name(name): checkpoint.info(name) for name in checkpoint.names if not _SKIPPED.search(name)}
    if EMBEDDING not in sources:
        raise InputError(f"the checkpoint has no {EMBEDDING}", where=str(checkpoint.path),
                         fix="give a causal language model folder saved by transformers")
    if family.head_is_embedding and HEAD in sources:
        if not _same_values(sources[HEAD], sources[EMBEDDING]):
            raise InputError(f"{family.label} in llama.cpp uses the embedding as its output head, but this model's "
                             "lm_head differs from it (an untied head)", where=str(checkpoint.path),
                             fix="export a model whose head is tied to the embedding")
        del sources[HEAD]
    planned = []
    for name, info in sources.items():
        target = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise InputError(f"llama.cpp's {family.arch_name} architecture has no tensor for {name!r}",
                             where=str(checkpoint.path), fix="this checkpoint has parts llama.cpp would not load")
        change = Change.NONE
        if family.permute_qk and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            change = Change.PERMUTE
        elif family.norm_plus_one and name.endswith("norm.weight"):
            change = Change.PLUS_ONE
        planned.append(PlannedTensor(target, info, tuple(info.shape), change))
    factors = llama3_rope_factors(config)
    if factors is not None:
        planned.append(PlannedTensor("rope_freqs.weight", None, tuple(factors.shape), values=factors))
    return sorted(planned, key=_order)


def _order(tensor: PlannedTensor) -> tuple:
    parts = tensor.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), tensor.name)
    return (0 if parts[0] in ("token_embd", "rope_freqs") else 2, 0, tensor.name)


@dataclass(frozen=True)
class Job:
    """A block of rows of one planned tensor, in one encoding: what a stream worker computes."""

    tensor: PlannedTensor
    encoding: gguf.GGMLQuantizationType
    first_row: int
    row_count: int

    @property
    def byte_offset(self) -> int:
        return encoded_nbytes((self.first_row, self.tensor.row_length), self.encoding) if self.first_row else 0

    @property
    def nbytes(self) -> int:
        return encoded_nbytes((self.row_count, self.tensor.row_length), self.encoding)

    @property
    def held_bytes(self) -> int:
        """Memory while prepared: the float32 rows and the encoded bytes."""
        return self.row_count * self.tensor.row_length * 4 + self.nbytes


def rows_per_job(tensor: PlannedTensor, head_dim: int) -> int:
    """Whole rows of about BLOCK_ELEMENTS values; whole heads for a permuted projection."""
    unit = head_dim if tensor.change is Change.PERMUTE and len(tensor.shape) > 1 else 1
    rows = max(1, BLOCK_ELEMENTS // max(1, tensor.row_length)) // unit * unit
    return max(unit, rows)


def jobs_for(tensors: list[PlannedTensor], file_type: GGUFType, head_dim: int) -> Iterator[Job]:
    """The jobs of a file of ``file_type``, tensor after tensor, rows in order."""
    for tensor in tensors:
        encoding = tensor_encoding(tensor.name, tensor.shape, file_type)
        if len(tensor.shape) <= 1:
            yield Job(tensor, encoding, 0, 1)
            continue
        step = rows_per_job(tensor, head_dim)
        for first in range(0, tensor.rows, step):
            yield Job(tensor, encoding, first, min(step, tensor.rows - first))


def permute_heads(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of a projection's rows: within each head, the two halves interleaved,
    ``W.reshape(heads, 2, d / 2, ...).swapaxes(1, 2)`` (llama.cpp's converter, ``LlamaModel.permute``)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def as_float32(values: "torch.Tensor") -> np.ndarray:
    """``values`` in float32 as a numpy array. bfloat16 widens exactly in numpy (its bits are the top half of a
    float32's), so the conversion makes no torch allocation: torch's are huge-page aligned in the ``mtool``
    executable (``THP_MEM_ALLOC_ENABLE``), which holds far more memory for blocks freed and made again."""
    import torch

    if values.dtype == torch.bfloat16:
        return (values.view(torch.int16).numpy().astype(np.uint32) << 16).view(np.float32)
    if values.dtype in (torch.float16, torch.float32, torch.float64):
        return values.numpy().astype(np.float32, copy=False)
    return values.float().numpy()


def encode_job(job: Job, config: ModelConfig) -> "torch.Tensor":
    """The GGUF bytes of ``job``'s rows (module docstring)."""
    import torch

    tensor = job.tensor
    if tensor.values is not None:
        rows = tensor.values
    else:
        assert tensor.source is not None
        width = tensor.row_length if len(tensor.shape) > 1 else tensor.shape[0]
        values = read_elements(tensor.source, job.first_row * width, job.row_count * width)
        rows = as_float32(values).reshape((job.row_count, width) if len(tensor.shape) > 1 else tensor.shape)
    if tensor.change is Change.PERMUTE:
        rows = permute_heads(rows, rows.shape[0] // config.head_dim)
    elif tensor.change is Change.PLUS_ONE:
        rows = rows + np.float32(1.0)
    encoded = gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), job.encoding)
    flat = np.ascontiguousarray(encoded).reshape(-1).view(np.uint8)
    if flat.nbytes != job.nbytes:
        raise AssertionError(f"{tensor.name}: {flat.nbytes} bytes encoded, {job.nbytes} planned")
    return torch.from_numpy(flat)
