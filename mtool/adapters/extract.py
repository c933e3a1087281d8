"""``mtool adapters extract``: a LoRA adapter approximating ``TUNED - BASE`` by truncated SVD per module.

For each 2-D weight that differs between the two models, ``dW = W_tuned - W_base`` (float32) is decomposed,
``dW = U S V^T``, and truncated to rank ``r`` -- a fixed ``--rank`` or, with ``--energy e``, the smallest
rank keeping ``sum(s[:r]^2) >= e * sum(s^2)`` -- giving ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` (the
best rank-r approximation in Frobenius norm). Linear layers become ``lora_A``/``lora_B``; embedding tables
(vocab x dim) become ``lora_embedding_A``/``lora_embedding_B`` of ``dW^T``. The relative error
``||dW - B @ A||_F / ||dW||_F`` is reported per module and overall.

Tensors that differ but are not 2-D (norms, biases) cannot be low-rank factors: they are listed, and with
``keep_other`` their whole modules go to ``modules_to_save``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mtool import ui
from mtool.adapters.basemodel import HEAD, tied_embedding
from mtool.adapters.peft_format import ModuleFactors, adapter_config, save_adapter_folder, target_module_names
from mtool.adapters.quantize import EMBEDDING_MARKERS
from mtool.adapters.report import FitReport, ModuleFit
from mtool.adapters.validate import positive_rank
from mtool.errors import InputError
from mtool.hub import resolve_model
from mtool.io.hashing import FileHasher
from mtool.io.reading import Checkpoint, open_checkpoint
from mtool.lineage import Lineage, describe_parent
from mtool.lora.adapter import PEFT_PREFIX, refuse_adapter
from mtool.lora.lowrank import rank_for_energy, thin_svd, truncation_energy


@dataclass(frozen=True)
class ExtractOptions:
    rank: int | None = None
    energy: float | None = None
    keep_other: bool = False
    dtype: "object | None" = None  # torch.dtype of the factors; default float32
    force: bool = False

    def check(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise InputError("give exactly one of --rank and --energy")
        positive_rank(self.rank)
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise InputError(f"--energy must be in (0, 1], got {self.energy}", where="--energy")


@dataclass
class ExtractResult:
    output: Path
    report: FitReport
    other: list[str] = field(default_factory=list)  # differing tensors that are not low-rank factors


def _pairs(base: Checkpoint, tuned: Checkpoint, base_config: dict) -> dict[str, str]:
    """Tuned tensor name -> the base tensor it is compared with (a tuned head against a tied base's embedding)."""
    embedding = tied_embedding(base, base_config)
    pairs = {}
    for name in tuned.names:
        if name in base:
            pairs[name] = name
        elif name == HEAD and embedding is not None:
            pairs[name] = embedding
        else:
            raise InputError(f"tensor {name} of TUNED is not in BASE", where=str(tuned.path),
                             fix="extract from a fine-tune of this very base")
    for name in base.names:
        if name not in pairs.values():
            raise InputError(f"tensor {name} of BASE is not in TUNED", where=str(tuned.path),
                             fix="extract from a fine-tune of this very base")
    return pairs


def _is_embedding(name: str) -> bool:
    return any(marker in name for marker in EMBEDDING_MARKERS)


def extract_adapter(base: str, tuned: str, output: str | os.PathLike, options: ExtractOptions, *,
                    hasher: FileHasher | None = None) -> ExtractResult:
    """Write the adapter approximating ``tuned - base`` to ``output``."""
    import torch

    hasher = hasher or FileHasher.default()
    options.check()
    base_ref, tuned_ref = resolve_model(base), resolve_model(tuned)
    for ref in (base_ref, tuned_ref):
        refuse_adapter(ref.path, fix="give two full models: the base and its fine-tune")
    base_checkpoint, tuned_checkpoint = open_checkpoint(base_ref.path), open_checkpoint(tuned_ref.path)
    base_config = base_checkpoint.read_json("config.json") or {}
    pairs = _pairs(base_checkpoint, tuned_checkpoint, base_config)
    for name, source in pairs.items():
        tuned_shape, base_shape = tuned_checkpoint.info(name).shape, base_checkpoint.info(source).shape
        if tuned_shape != base_shape:
            raise InputError(f"tensor {name} is {list(base_shape)} in BASE but {list(tuned_shape)} in TUNED",
                             where=str(tuned_ref.path), fix="extract from a fine-tune of this very base")
    report = FitReport()
    factors: list[ModuleFactors] = []
    other: list[str] = []
    with torch.inference_mode():
        for name, source in ui.progress(list(pairs.items()), desc="extract", unit="tensor"):
            tuned_weight, base_weight = tuned_checkpoint.read(name), base_checkpoint.read(source)
            if torch.equal(tuned_weight, base_weight) or not tuned_weight.is_floating_point():
                continue
            if tuned_weight.dim() != 2 or not name.endswith(".weight"):
                other.append(name)
                continue
            delta = tuned_weight.float() - base_weight.float()
            embedding = _is_embedding(name)
            decomposition = thin_svd(delta.T if embedding else delta)
            if options.rank is not None:
                rank = min(options.rank, decomposition.s.numel())
            else:
                rank = rank_for_energy(decomposition.s, options.energy)
            low = decomposition.factors(rank)
            module = name[: -len(".weight")]
            factors.append(ModuleFactors(module, low.a, low.b, embedding))
            report.modules.append(ModuleFit(module, rank, *truncation_energy(decomposition.s, rank)))
    if not factors:
        raise InputError("TUNED does not differ from BASE in any 2-D weight: there is nothing to extract",
                         where=str(tuned_ref.path))
    extra, saved_modules = _other_modules(tuned_checkpoint, other) if options.keep_other else ({}, [])
    if other and not options.keep_other:
        ui.warn(f"{len(other)} changed tensors are not 2-D weights and are not in the adapter (e.g. {other[0]}); "
                "--keep-other stores their modules whole (modules_to_save)")
    all_modules = [n[: -len(".weight")] for n in tuned_checkpoint.names if n.endswith(".weight")]
    config = adapter_config(factors, target_modules=target_module_names([f.module for f in factors], all_modules),
                            base_model=base_ref.id, modules_to_save=saved_modules or None)
    if base_config.get("architectures") and not str(base_config["architectures"][0]).endswith("ForCausalLM"):
        config["task_type"] = None
    record = Lineage(operation="extract", method="svd",
                     parents=[describe_parent(base_ref, "base", hasher=hasher),
                              describe_parent(tuned_ref, "model", hasher=hasher)],
                     parameters={"rank": options.rank, "energy": options.energy, "keep_other": options.keep_other},
                     metrics={**report.metrics(), "not_low_rank": other})
    save_adapter_folder(output, factors, config, record, dtype=options.dtype or torch.float32,
                        inputs=[base_ref.path, tuned_ref.path], force=options.force, hasher=hasher, extra=extra)
    return ExtractResult(Path(output), report, other)


def _other_modules(tuned: Checkpoint, names: list[str]) -> tuple[dict, list[str]]:
    """The tensors of every module owning a changed non-2-D tensor, under PEFT's modules_to_save keys."""
    modules = sorted({name.rsplit(".", 1)[0] for name in names})
    tensors = {f"{PEFT_PREFIX}{name}": tuned.read(name) for name in tuned.names
               if name.rsplit(".", 1)[0] in modules}
    return tensors, modules
