"""``mtool adapters inspect``: what a PEFT LoRA adapter is, and whether it fits a base (headers only)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from mtool.adapters.basemodel import fit_problems
from mtool.hub import resolve_model
from mtool.io.reading import open_checkpoint
from mtool.lora.adapter import LoraAdapter, load_lora, refuse_adapter


@dataclass
class ShapeCheck:
    """The base side of ``--base``: how many changed tensors fit, and each one that does not."""

    base: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return not self.problems


@dataclass
class AdapterSummary:
    path: str
    peft_type: str
    variant: str  # LoRA, rsLoRA, DoRA, rsLoRA + DoRA
    rank: int
    alpha: float
    ranks: dict[str, int]  # distinct rank -> number of modules
    scales: dict[str, int]
    target_modules: list[str]  # leaf names, e.g. q_proj
    modules: int
    embedding_modules: int
    modules_to_save: list[str]
    trainable_tokens: dict[str, int]  # tensor -> number of rows
    fan_in_fan_out: bool
    lora_bias: bool
    trainable_parameters: int
    dtypes: dict[str, int]
    size_bytes: int
    base_model: str | None
    task_type: str | None
    base_check: ShapeCheck | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.base_check is not None:
            data["base_check"]["compatible"] = self.base_check.compatible
        return data


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def summarize(adapter: LoraAdapter) -> AdapterSummary:
    """Describe ``adapter`` from its config and tensor headers."""
    settings = adapter.settings
    modules = list(adapter.targets.values())
    variant = " + ".join(part for part, used in (("rsLoRA", settings.use_rslora), ("DoRA", adapter.use_dora)) if used)
    trainable = sum(info.numel for name, info in adapter.checkpoint.tensors.items() if ".base_layer." not in name)
    return AdapterSummary(
        path=str(adapter.folder),
        peft_type="LORA",
        variant=variant or "LoRA",
        rank=settings.rank,
        alpha=settings.alpha,
        ranks={str(rank): count for rank, count in sorted(Counter(m.rank for m in modules).items())},
        scales={f"{scale:g}": count for scale, count in sorted(Counter(m.scale for m in modules).items())},
        target_modules=sorted({_leaf(m.module) for m in modules}),
        modules=len(modules),
        embedding_modules=sum(m.is_embedding for m in modules),
        modules_to_save=sorted({name.rsplit(".", 1)[0] for name, key in adapter.replacements.items()
                                if ".base_layer." not in key}),
        trainable_tokens={name: len(rows.indices) for name, rows in sorted(adapter.token_rows.items())},
        fan_in_fan_out=settings.fan_in_fan_out,
        lora_bias=bool(adapter.bias_updates),
        trainable_parameters=trainable,
        dtypes=dict(Counter(info.dtype_name for info in adapter.checkpoint.tensors.values())),
        size_bytes=sum(os.path.getsize(f) for f in adapter.checkpoint.weight_files),
        base_model=settings.base_model,
        task_type=adapter.config.get("task_type"),
    )


def check_against_base(adapter: LoraAdapter, base: str) -> ShapeCheck:
    """Compare the shape every changed tensor needs with the base's (tied heads map to the embedding)."""
    ref = resolve_model(base)
    refuse_adapter(ref.path, what="a base model (--base)")
    checkpoint = open_checkpoint(ref.path)
    checked, problems = fit_problems(adapter, checkpoint, checkpoint.read_json("config.json") or {})
    return ShapeCheck(base=ref.id, checked=checked, problems=problems)


def inspect_adapter(folder: str, base: str | None = None) -> AdapterSummary:
    adapter = load_lora(resolve_model(folder).path)
    summary = summarize(adapter)
    if base is not None:
        summary.base_check = check_against_base(adapter, base)
    return summary


def format_summary(summary: AdapterSummary) -> str:
    """Human-readable lines for the terminal."""
    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{key} ({value})" if len(mapping) > 1 else key for key, value in mapping.items())

    lines = [
        f"adapter:          {summary.path}",
        f"type:             {summary.variant}" + (" (fan_in_fan_out)" if summary.fan_in_fan_out else "")
        + (" with lora_bias" if summary.lora_bias else ""),
        f"rank:             {counts(summary.ranks) or summary.rank}  (config r={summary.rank}, "
        f"alpha={summary.alpha:g}; scale {counts(summary.scales)})",
        f"targets:          {summary.modules} modules: {', '.join(summary.target_modules)}"
        + (f" ({summary.embedding_modules} embedding)" if summary.embedding_modules else ""),
    ]
    if summary.modules_to_save:
        lines.append(f"modules_to_save:  {', '.join(summary.modules_to_save)}")
    if summary.trainable_tokens:
        lines.append("trainable tokens: " + ", ".join(f"{k} ({v} rows)" for k, v in summary.trainable_tokens.items()))
    lines += [
        f"parameters:       {summary.trainable_parameters:,} trainable",
        f"dtype:            {counts(summary.dtypes)}",
        f"size:             {summary.size_bytes / 2**20:.2f} MiB",
        f"base model:       {summary.base_model or 'unknown'}",
    ]
    if summary.task_type:
        lines.append(f"task type:        {summary.task_type}")
    check = summary.base_check
    if check is not None:
        if check.compatible:
            lines.append(f"base check:       compatible with {check.base} ({check.checked} tensors checked)")
        else:
            lines.append(f"base check:       NOT compatible with {check.base}: {len(check.problems)} of "
                         f"{check.checked} tensors do not fit")
            lines += [f"  {problem}" for problem in check.problems]
    return "\n".join(lines)
