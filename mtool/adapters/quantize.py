"""The base a QLoRA adapter saw in training: its linear weights rounded through bitsandbytes 4-bit.

QLoRA trains the adapter against ``dequantize(quantize_4bit(W))``, not against ``W``. Merging into that
rounded base reproduces the training-time model exactly (``--dequantized-base``); merging into the original
16-bit ``W`` (the default) keeps the base's full precision and is what most published merges do.

Which tensors transformers quantizes when it loads a model with ``BitsAndBytesConfig(load_in_4bit=True)``:
the weights of ``nn.Linear`` layers except the output head (``lm_head``) and any module named in
``llm_int8_skip_modules``. Embeddings, norms and biases stay in 16 bits. From a checkpoint's names alone a
linear weight is a 2-D ``*.weight`` that is not an embedding table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

QUANT_TYPES = ("nf4", "fp4")
EMBEDDING_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                     "shared.weight")


@dataclass(frozen=True)
class QuantSettings:
    """``BitsAndBytesConfig`` settings of the training run: ``bnb_4bit_quant_type``, the block size, and
    ``bnb_4bit_use_double_quant`` (double quantization of the absmax statistics)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ("lm_head",)

    def describe(self) -> dict[str, object]:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "skip_modules": list(self.skip_modules)}


def is_quantized_weight(name: str, shape: tuple[int, ...], settings: QuantSettings) -> bool:
    """Whether bitsandbytes 4-bit loading would quantize the tensor ``name``: a linear layer's weight."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    if any(marker in name for marker in EMBEDDING_MARKERS):
        return False
    module = name[: -len(".weight")]
    return not any(module == skip or module.endswith(f".{skip}") or f".{skip}." in f".{module}."
                   for skip in settings.skip_modules)


def dequantized(weight: "torch.Tensor", settings: QuantSettings) -> "torch.Tensor":
    """``dequantize_4bit(quantize_4bit(W))`` with the training run's settings, in float32: each entry is its
    4-bit code's value times its block's scale, exactly (rounding it to ``W``'s 16-bit dtype here would round the
    merged weight twice)."""
    import copy

    import bitsandbytes.functional as bnb_functional
    import torch

    packed, state = bnb_functional.quantize_4bit(weight.contiguous(), blocksize=settings.blocksize,
                                                 compress_statistics=settings.double_quant,
                                                 quant_type=settings.quant_type)
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnb_functional.dequantize_4bit(packed, state, blocksize=settings.blocksize,
                                          quant_type=settings.quant_type)
