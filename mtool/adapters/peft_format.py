"""Writing a PEFT LoRA adapter folder that ``PeftModel.from_pretrained`` loads.

Every adapter mtool writes stores its factors already scaled: each module's ``lora_alpha`` equals its rank
(``alpha_pattern`` = ``rank_pattern`` where a module's rank differs from ``r``), so ``s = 1`` and the
update is exactly ``B @ A``. Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight``, or ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.io.writing import save_tensors
from mtool.lora.adapter import ADAPTER_CONFIG, PEFT_PREFIX

if TYPE_CHECKING:
    import torch

    from mtool.io.hashing import FileHasher
    from mtool.lineage import Lineage


@dataclass(frozen=True)
class ModuleFactors:
    """The factors of one module as PEFT stores them: ``a`` (r x in), ``b`` (out x r); for an embedding
    ``a`` is (r x vocab) and ``b`` (dim x r)."""

    module: str
    a: "torch.Tensor"
    b: "torch.Tensor"
    is_embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def keys(self) -> tuple[str, str]:
        if self.is_embedding:
            return f"{PEFT_PREFIX}{self.module}.lora_embedding_A", f"{PEFT_PREFIX}{self.module}.lora_embedding_B"
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight", f"{PEFT_PREFIX}{self.module}.lora_B.weight"


def module_pattern(module: str) -> str:
    """A ``rank_pattern`` key that matches exactly this module under PEFT's ``(.*\\.)?(key)$`` rule."""
    return re.escape(module)


def target_module_names(modules: Iterable[str], all_modules: Iterable[str] | None = None) -> list[str]:
    """``target_modules`` for PEFT: leaf names (``q_proj``) when every module of the base with that leaf name is
    targeted, the full module names otherwise."""
    modules = sorted(set(modules))
    if all_modules is None:
        return modules
    by_leaf: dict[str, set[str]] = {}
    for name in all_modules:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    chosen: set[str] = set()
    for module in modules:
        leaf = module.rsplit(".", 1)[-1]
        chosen.add(leaf if by_leaf.get(leaf, set()) <= set(modules) else module)
    return sorted(chosen)


def adapter_config(factors: list[ModuleFactors], *, target_modules: list[str], base_model: str | None,
                   template: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """``adapter_config.json`` for ``factors`` (scale 1 everywhere), starting from ``template`` when given."""
    ranks = Counter(f.rank for f in factors)
    rank = ranks.most_common(1)[0][0] if ranks else 1
    pattern = {module_pattern(f.module): f.rank for f in factors if f.rank != rank}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    config.update({k: v for k, v in (template or {}).items() if k not in ("revision",)})
    config.update({
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": target_modules,
        "base_model_name_or_path": base_model,
    })
    config.update(overrides)
    return config


def write_adapter(folder: str | Path, factors: list[ModuleFactors], config: dict[str, Any], *,
                  dtype: "torch.dtype", extra: dict[str, "torch.Tensor"] | None = None) -> list[Path]:
    """Write ``adapter_model.safetensors`` (factors cast to ``dtype``, plus ``extra`` tensors under their own
    keys) and ``adapter_config.json`` into ``folder``."""
    folder = Path(folder)
    tensors: dict[str, "torch.Tensor"] = {}
    for item in factors:
        key_a, key_b = item.keys()
        tensors[key_a] = item.a.to(dtype).contiguous()
        tensors[key_b] = item.b.to(dtype).contiguous()
    tensors.update(extra or {})
    files = save_tensors(folder, tensors, file_stem="adapter_model")
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files


def save_adapter_folder(output: str | Path, factors: list[ModuleFactors], config: dict[str, Any], record: "Lineage", *,
                        dtype: "torch.dtype", inputs: list[str | Path], force: bool, hasher: "FileHasher",
                        extra: dict[str, "torch.Tensor"] | None = None) -> Path:
    """Write a complete adapter folder atomically: weights, config, then ``record`` and the card."""
    from mtool.io.folders import atomic_output_dir
    from mtool.naming.finish import finish_output

    with atomic_output_dir(output, force=force, inputs=inputs) as staging:
        write_adapter(staging, factors, config, dtype=dtype, extra=extra)
        record.parameter_count = sum(f.a.numel() + f.b.numel() for f in factors) + \
            sum(t.numel() for t in (extra or {}).values())
        record.is_adapter = True
        finish_output(staging, record, hasher=hasher)
    return Path(output)
