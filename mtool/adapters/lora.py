"""Reading a PEFT LoRA adapter folder and applying it to base tensors one at a time.

PEFT stores, for each adapted module ``M`` of the base, ``base_model.model.M.lora_A.weight`` (r x in) and
``base_model.model.M.lora_B.weight`` (out x r) — embeddings use ``lora_embedding_A`` (r x vocab) and
``lora_embedding_B`` (dim x r) — plus ``lora_magnitude_vector`` for DoRA, and full copies of the
``modules_to_save``. The merged weight of ``M.weight`` is

    W' = W + s * B @ A                  (transposed for fan_in_fan_out layers and for embeddings)
    W' = m / ||W + s * B @ A||_row * (W + s * B @ A)       (DoRA: m per output row)

with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA), ``r`` and ``alpha`` taken from ``rank_pattern`` /
``alpha_pattern`` where a pattern matches the module. Everything is computed in float32.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.checkpoint import Checkpoint, open_checkpoint
from mtool.errors import InputError

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA",)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a ``rank_pattern``/``alpha_pattern`` key applies to a module whose name ends with it
    (as a regex, at a dot boundary)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors live and how to scale them."""

    module: str  # base module name, e.g. model.layers.0.self_attn.q_proj
    key_a: str
    key_b: str
    rank: int
    scale: float
    fan_in_fan_out: bool
    is_embedding: bool
    magnitude_key: str | None = None  # DoRA

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"


class LoraAdapter:
    """A PEFT LoRA adapter, read lazily: factors are loaded when a tensor asks for them."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        config_path = self.folder / "adapter_config.json"
        if not config_path.is_file():
            raise InputError("not a PEFT adapter folder: adapter_config.json is missing", where=str(self.folder),
                             fix="point at the folder PEFT's save_pretrained wrote")
        self.checkpoint: Checkpoint = open_checkpoint(self.folder)
        self.config: dict = self.checkpoint.read_json("adapter_config.json") or {}
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type not in SUPPORTED_PEFT_TYPES:
            raise InputError(f"adapter type {peft_type} is not supported (only LoRA, including rsLoRA and DoRA)",
                             where=str(config_path))
        rank = int(self.config.get("r", 8))
        if rank <= 0:
            raise InputError(f"adapter rank r = {rank} must be positive", where=str(config_path))
        self.modules: dict[str, LoraModule] = {}
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save)
        self._index_tensors()

    @property
    def base_model_id(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def _index_tensors(self) -> None:
        config = self.config
        default_rank = int(config.get("r", 8))
        default_alpha = float(config.get("lora_alpha", default_rank))
        for key in self.checkpoint.names:
            if not key.startswith(PEFT_PREFIX):
                continue
            name = key[len(PEFT_PREFIX):]
            match = re.match(r"^(.*)\.(lora_A|lora_embedding_A)(?:\.[^.]+)?\.weight$", name) or \
                re.match(r"^(.*)\.(lora_A|lora_embedding_A)(?:\.weight)?$", name)
            if match:
                module, kind = match.group(1), match.group(2)
                embedding = kind == "lora_embedding_A"
                key_b = key.replace("lora_embedding_A" if embedding else "lora_A",
                                    "lora_embedding_B" if embedding else "lora_B")
                if key_b not in self.checkpoint:
                    raise InputError(f"adapter tensor {key} has no matching B factor", where=str(self.folder))
                rank = int(pattern_value(config.get("rank_pattern"), module, default_rank))
                alpha = float(pattern_value(config.get("alpha_pattern"), module, default_alpha))
                actual_rank = self.checkpoint.info(key).shape[0]
                if actual_rank != rank:
                    rank = actual_rank
                scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
                magnitude = next((k for k in (f"{PEFT_PREFIX}{module}.lora_magnitude_vector",
                                              f"{PEFT_PREFIX}{module}.lora_magnitude_vector.weight")
                                  if k in self.checkpoint), None)
                self.modules[f"{module}.weight"] = LoraModule(
                    module=module, key_a=key, key_b=key_b, rank=rank, scale=scale,
                    fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not embedding,
                    is_embedding=embedding, magnitude_key=magnitude)
            elif "lora_" not in name:
                # a modules_to_save copy, stored under the base module's own name
                self.replacements[name.replace(".modules_to_save.default", "")] = key

    def touches(self, name: str) -> bool:
        return name in self.modules or name in self.replacements

    def delta(self, name: str) -> "torch.Tensor | None":
        """``s * B @ A`` in float32, laid out like the base tensor ``name`` (None if not adapted)."""
        module = self.modules.get(name)
        if module is None:
            return None
        a = self.checkpoint.read(module.key_a).float()
        b = self.checkpoint.read(module.key_b).float()
        product = b @ a
        if module.fan_in_fan_out or module.is_embedding:
            product = product.T
        return product.mul_(module.scale)

    def apply(self, name: str, weight: "torch.Tensor") -> "torch.Tensor":
        """The merged float32 tensor ``name`` given the base's ``weight`` (any dtype)."""
        if name in self.replacements:
            replacement = self.checkpoint.read(self.replacements[name]).float()
            if tuple(replacement.shape) != tuple(weight.shape):
                raise InputError(f"modules_to_save tensor {name} is {tuple(replacement.shape)} but the base's is "
                                 f"{tuple(weight.shape)}", where=str(self.folder))
            return replacement
        delta = self.delta(name)
        if delta is None:
            return weight.float()
        if tuple(delta.shape) != tuple(weight.shape):
            raise InputError(f"the adapter does not fit this base: {name} is {tuple(weight.shape)} in the base but the "
                             f"adapter's update is {tuple(delta.shape)}", where=str(self.folder),
                             fix="use the base model the adapter was trained on")
        merged = weight.float() + delta
        module = self.modules[name]
        if module.magnitude_key is not None:
            magnitude = self.checkpoint.read(module.magnitude_key).float()
            norm = merged.norm(p=2, dim=0 if module.fan_in_fan_out else 1)
            scale = magnitude / norm
            merged = merged * (scale.view(1, -1) if module.fan_in_fan_out else scale.view(-1, 1))
        return merged


def load_lora(folder: str | os.PathLike) -> LoraAdapter:
    return LoraAdapter(folder)
