"""``mtool adapters resize``: lower a LoRA adapter's rank by truncated SVD of each module's update.

For each module the update ``dW = s * B @ A`` (rank ``r``) is decomposed without forming it (QR of both
factors, SVD of the r x r core: :func:`~mtool.lora.lowrank.product_svd`) and truncated to the new rank
``k = min(R, r)``; the error ``||dW - B' @ A'||_F / ||dW||_F`` is the norm of the dropped singular values. The
new factors hold the scale (``lora_alpha = r``, so ``s = 1``); a resize to the same rank is lossless.
Everything that is not a LoRA factor (DoRA magnitudes, ``modules_to_save`` copies, trainable tokens, saved
embedding layers) is copied as it is; ``lora_B.bias`` is multiplied by the old scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mtool.adapters.peft_format import ModuleFactors, adapter_config, save_adapter_folder
from mtool.adapters.report import FitReport, ModuleFit
from mtool.adapters.validate import positive_rank
from mtool.errors import InputError
from mtool.hub import resolve_model
from mtool.io.hashing import FileHasher
from mtool.lineage import Lineage, describe_parent
from mtool.lora.adapter import load_lora
from mtool.lora.lowrank import product_svd, truncation_energy


@dataclass(frozen=True)
class ResizeResult:
    output: Path
    report: FitReport


def resize_adapter(adapter: str, output: str | os.PathLike, rank: int, *, force: bool = False,
                   hasher: FileHasher | None = None) -> ResizeResult:
    """Write ``adapter`` at rank ``rank`` (modules of lower rank keep theirs) to ``output``."""
    import torch

    hasher = hasher or FileHasher.default()
    positive_rank(rank)
    ref = resolve_model(adapter)
    lora = load_lora(ref.path)
    largest = max((module.rank for module in lora.targets.values()), default=0)
    if rank > largest:
        raise InputError(f"--rank {rank} is above the adapter's largest rank {largest}: a resize only lowers ranks, "
                         "so it would write a copy", where=str(ref.path),
                         fix=f"give a rank below {largest}, or keep the adapter as it is")
    report = FitReport()
    factors: list[ModuleFactors] = []
    with torch.inference_mode():
        for name, module in lora.targets.items():
            a, b = lora.factors(name)
            decomposition = product_svd(a, b * module.scale)
            kept = min(rank, module.rank)
            low = decomposition.factors(kept)
            factors.append(ModuleFactors(module.module, low.a, low.b, module.is_embedding))
            report.modules.append(ModuleFit(module.module, kept, *truncation_energy(decomposition.s, kept)))
        extra = _carried_tensors(lora)
    dtype = lora.checkpoint.info(next(iter(lora.targets.values())).key_a).dtype if lora.targets else torch.float32
    config = adapter_config(factors, target_modules=lora.config.get("target_modules"), base_model=lora.base_model_id,
                            template=lora.config, use_dora=lora.use_dora)
    record = Lineage(operation="resize", method="svd", parents=[describe_parent(ref, "adapter", hasher=hasher)],
                     parameters={"rank": rank}, metrics=report.metrics())
    save_adapter_folder(output, factors, config, record, dtype=dtype, inputs=[ref.path], force=force, hasher=hasher,
                        extra=extra)
    return ResizeResult(Path(output), report)


def _carried_tensors(lora) -> dict:
    """Every adapter tensor that is not an A/B factor, unchanged (biases scaled into ``s = 1``)."""
    factor_keys = {key for module in lora.targets.values() for key in (module.key_a, module.key_b)}
    bias_scale = {module.bias_key: module.scale for module in lora.targets.values() if module.bias_key}
    carried = {}
    for key in lora.checkpoint.names:
        if key in factor_keys:
            continue
        tensor = lora.checkpoint.read(key)
        if key in bias_scale:
            tensor = (tensor.float() * bias_scale[key]).to(tensor.dtype)
        carried[key] = tensor
    return carried
