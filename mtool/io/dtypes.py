"""Element types: one table from safetensors' names to torch dtypes, sizes and the spellings users write.

The table lists safetensors' dtypes in the order of its own ``Dtype`` enum: safetensors' writer sorts the
tensors of a file by that rank (largest first), then by name, and :mod:`mtool.io.writing` does the same so that
its files are byte-for-byte safetensors'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtool.errors import CheckpointError, InputError, shown

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ElementType:
    """One safetensors dtype: its name in headers, bits per element, the torch dtype (attribute name of
    ``torch``; None where torch has none) and the spellings ``parse_dtype`` accepts for it."""

    name: str
    bits: int
    torch_name: str | None = None
    spellings: tuple[str, ...] = ()


ELEMENT_TYPES: tuple[ElementType, ...] = (
    ElementType("BOOL", 8, "bool"),
    ElementType("F4", 4),
    ElementType("F6_E2M3", 6),
    ElementType("F6_E3M2", 6),
    ElementType("U8", 8, "uint8"),
    ElementType("I8", 8, "int8"),
    ElementType("F8_E5M2", 8, "float8_e5m2"),
    ElementType("F8_E4M3", 8, "float8_e4m3fn"),
    ElementType("F8_E8M0", 8),
    ElementType("I16", 16, "int16"),
    ElementType("U16", 16, "uint16"),
    ElementType("F16", 16, "float16", ("float16", "fp16", "half")),
    ElementType("BF16", 16, "bfloat16", ("bfloat16", "bf16")),
    ElementType("I32", 32, "int32"),
    ElementType("U32", 32, "uint32"),
    ElementType("F32", 32, "float32", ("float32", "fp32", "float")),
    ElementType("C64", 64, "complex64"),
    ElementType("F64", 64, "float64", ("float64", "fp64")),
    ElementType("I64", 64, "int64"),
    ElementType("U64", 64, "uint64"),
)  # fmt: skip

_BY_NAME = {entry.name: entry for entry in ELEMENT_TYPES}
RANK = {entry.name: rank for rank, entry in enumerate(ELEMENT_TYPES)}  # safetensors' enum order


def element_bits(name: str) -> int | None:
    """Bits per element of the safetensors dtype ``name`` (None for a name safetensors does not know)."""
    entry = _BY_NAME.get(name)
    return None if entry is None else entry.bits


def _torch_dtype(entry: ElementType) -> "torch.dtype | None":
    import torch

    return getattr(torch, entry.torch_name, None) if entry.torch_name else None


def dtype_from_safetensors(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    entry = _BY_NAME.get(name)
    dtype = _torch_dtype(entry) if entry is not None else None
    if dtype is None:
        raise CheckpointError(f"unsupported safetensors dtype {name!r}")
    return dtype


def dtype_to_safetensors(dtype: "torch.dtype") -> str:
    """The safetensors dtype string of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    for entry in ELEMENT_TYPES:
        if entry.torch_name is not None and _torch_dtype(entry) == dtype:
            return entry.name
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")


def parse_dtype(name: str, where: str | None = None) -> "torch.dtype":
    """A dtype from a user's spelling: ``bfloat16``/``bf16``, ``float16``/``fp16``/``half``, ``float32``..."""
    key = str(name).lower().removeprefix("torch.")
    for entry in ELEMENT_TYPES:
        if key in entry.spellings:
            return _torch_dtype(entry)
    raise InputError(f"unknown dtype {shown(name, 40)}", where=where or "dtype",
                     fix="use one of bfloat16, float16, float32, float64")


def dtype_label(dtype: "torch.dtype") -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how configs and lineage records spell a dtype."""
    return str(dtype).removeprefix("torch.")
