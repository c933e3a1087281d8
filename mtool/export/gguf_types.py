"""The GGUF file types ``mtool export gguf --type`` writes, and the type each tensor gets in them.

A file type is the encoding of a file's matrices (llama.cpp's ``general.file_type``, the ``Q8_0`` in
``Model-Q8_0.gguf``). gguf-py, llama.cpp's own Python package, implements the quantizers of F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0 and Q5_1 (its Q8_0, Q4_0 and Q5_0 blocks are bit for bit llama.cpp's); mtool uses them and
nothing else. K-quants (Q4_K_M, Q6_K, ...) and i-quants (IQ4_XS, ...) are made by llama.cpp's C++ quantizer
only: asked for, they are refused with the ``llama-quantize`` command that makes them from an F16 export.

Which tensors keep more precision (llama.cpp's converter does the same, ``convert_hf_to_gguf.py``):

* vectors (norms, biases, ``rope_freqs``) and any tensor that is not a ``.weight`` stay F32;
* a matrix whose rows are not a whole number of quantization blocks (32 values for the Q types) is written F16,
  which llama.cpp requires (it cannot address a partial block), and the export says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType, LlamaFileType

from mtool.errors import InputError


@dataclass(frozen=True)
class GGUFType:
    """A file type: its name in file names (``Q8_0``), the tensor encoding and llama.cpp's file-type id."""

    name: str
    tensor_type: GGMLQuantizationType
    file_type: LlamaFileType

    @property
    def option(self) -> str:
        """How ``--type`` spells it: ``q8_0``."""
        return self.name.lower()

    @property
    def block_size(self) -> int:
        """Values per quantization block (1 for float types): a quantized row holds a whole number of them."""
        return gguf.GGML_QUANT_SIZES[self.tensor_type][0]

    @property
    def quantized(self) -> bool:
        return self.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _type(name: str, file_type: LlamaFileType) -> GGUFType:
    return GGUFType(name, GGMLQuantizationType[name], file_type)


GGUF_TYPES: dict[str, GGUFType] = {t.option: t for t in (
    _type("F32", LlamaFileType.ALL_F32),
    _type("F16", LlamaFileType.MOSTLY_F16),
    _type("BF16", LlamaFileType.MOSTLY_BF16),
    _type("Q8_0", LlamaFileType.MOSTLY_Q8_0),
    _type("Q4_0", LlamaFileType.MOSTLY_Q4_0),
    _type("Q4_1", LlamaFileType.MOSTLY_Q4_1),
    _type("Q5_0", LlamaFileType.MOSTLY_Q5_0),
    _type("Q5_1", LlamaFileType.MOSTLY_Q5_1),
)}
F32 = GGMLQuantizationType.F32
F16 = GGMLQuantizationType.F16


def llama_cpp_only_types() -> list[str]:
    """File types llama.cpp knows that gguf-py cannot make (``q4_k_m``, ``iq4_xs``, ``tq1_0``, ...)."""
    return [member.name.removeprefix("MOSTLY_").lower() for member in LlamaFileType
            if member.name.startswith("MOSTLY_") and member.name.removeprefix("MOSTLY_").lower() not in GGUF_TYPES]


def parse_types(options: Sequence[str]) -> list[GGUFType]:
    """The file types ``options`` name, in order and each once; InputError for the others (see the module
    docstring)."""
    chosen: list[GGUFType] = []
    for option in options:
        key = option.strip().lower()
        if key in GGUF_TYPES:
            if GGUF_TYPES[key] not in chosen:
                chosen.append(GGUF_TYPES[key])
            continue
        if key in llama_cpp_only_types():
            name = key.upper()
            raise InputError(
                f"{name} is made by llama.cpp's C++ quantizer; gguf-py, which mtool writes GGUF with, has no "
                f"{name} quantizer", where="--type",
                fix=f"export f16 (or bf16) with mtool, then run llama.cpp's `llama-quantize MODEL-F16.gguf "
                    f"MODEL-{name}.gguf {name}`")
        raise InputError(f"unknown GGUF type {option!r}", where="--type",
                         fix=f"use one of {', '.join(GGUF_TYPES)}")
    if not chosen:
        raise InputError("no GGUF type given", where="--type", fix=f"use one or more of {', '.join(GGUF_TYPES)}")
    return chosen


def tensor_encoding(name: str, shape: Sequence[int], file_type: GGUFType) -> GGMLQuantizationType:
    """The encoding of the GGUF tensor ``name`` (shape in row-major order) in a file of ``file_type`` (see the
    module docstring): F32 for vectors, norms and non-weights; F16 for rows that are not whole blocks."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return F32
    if file_type.quantized and shape[-1] % file_type.block_size:
        return F16
    return file_type.tensor_type


def encoded_nbytes(shape: Sequence[int], encoding: GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``shape`` in ``encoding``."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[encoding]
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows * (shape[-1] // block) * block_bytes
