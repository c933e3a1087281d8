"""The output folder of a training run: adapter, tokenizer, config, metrics, loss curve, lineage, card."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtool.hub import ModelRef
from mtool.io.folders import RECORD_ALLOWANCE, atomic_output_dir, support_files_bytes
from mtool.io.hashing import FileHasher
from mtool.lineage import Dataset, Lineage, describe_parent
from mtool.naming.finish import finish_output
from mtool.reproducible import recorded_metrics, source_date_epoch
from mtool.train.config import CONFIG_FILENAME, TrainConfig
from mtool.train.data import DataStats
from mtool.train.lean_model import ModelModes
from mtool.train.metrics import MetricsLog, plot_losses


@dataclass(frozen=True)
class OutputFacts:
    """What the run resolved, for the lineage record and the card."""

    config: TrainConfig
    base: ModelRef
    data_sha256: str
    data_format: str
    stats: DataStats
    added_tokens: list[str]
    total_steps: int
    warmup_steps: int
    world_size: int
    compute_dtype: str
    modes: ModelModes
    train_examples: int
    eval_examples: int


def write_output(out: Path, model: Any, tokenizer: Any, facts: OutputFacts, metrics: dict[str, Any],
                 metrics_log: MetricsLog, *, force: bool, hasher: FileHasher,
                 trainable: dict[str, Any] | None = None) -> Path:
    """Write the adapter folder atomically (nothing appears at ``out`` unless all of it was written).
    ``trainable``: the gathered trainable parameters of a sharded (FSDP) model."""
    config = facts.config
    with atomic_output_dir(out, force=force, inputs=[facts.base.path], needed_bytes=output_bytes(model, facts.base)) \
            as staging:
        if trainable is None:
            model.save_pretrained(staging)
        else:
            model.save_pretrained(staging, state_dict=trainable)
        _point_adapter_at_base(staging, facts.base)
        tokenizer.save_pretrained(staging)
        (staging / CONFIG_FILENAME).write_text(config.to_yaml(), encoding="utf-8")
        rows = metrics_log.rows()
        if source_date_epoch() is None:
            shutil.copyfile(metrics_log.path, staging / "metrics.jsonl")
        else:  # reproducible: the losses, without the times and memory of this run (mtool.reproducible)
            (staging / "metrics.jsonl").write_text("".join(json.dumps(recorded_metrics(row)) + "\n" for row in rows),
                                                   encoding="utf-8")
        plot_losses(rows, staging / "loss.png", title=f"{Path(config.base).name} - {config.method}")
        finish_output(staging, lineage_record(facts, model, metrics, hasher), hasher=hasher)
    return out


def output_bytes(model: Any, base: ModelRef) -> int:
    """What the adapter folder will take: the trainable tensors as saved (in their dtype), the tokenizer files,
    and an allowance for the config, metrics, loss plot, record and card (for the free-space check)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return trainable + support_files_bytes(base.path, config=False) + RECORD_ALLOWANCE + 512 * 1024


def _point_adapter_at_base(folder: Path, base: ModelRef) -> None:
    """``base_model_name_or_path``: the Hub id for a Hub base, else the local folder (not a cache path). PEFT writes
    ``target_modules`` (and ``exclude_modules``) from a set, in an order that changes with Python's hash seed; they
    are sorted here so that the file is the same on every run."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base.id if base.is_hub else str(Path(base.path).resolve())
    if base.revision:
        data["revision"] = base.revision
    for key in ("target_modules", "exclude_modules"):
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def lineage_record(facts: OutputFacts, model: Any, metrics: dict[str, Any], hasher: FileHasher) -> Lineage:
    """The record of a training run (its ``outputs`` are filled in by :func:`finish_output`)."""
    config = facts.config
    peft_config = model.peft_config["default"]
    targets = peft_config.target_modules
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    settings = config.training
    parameters = {
        "objective": "sft",
        "lora_scale": config.lora.resolved_alpha
        / (config.lora.rank ** 0.5 if config.lora.rslora else config.lora.rank),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in targets})
        if isinstance(targets, (set, list)) else targets,
        "modules_to_save": sorted(peft_config.modules_to_save or []),
        "added_tokens": facts.added_tokens,
        "compute_dtype": facts.compute_dtype,
        **facts.modes.as_record(),
        "parallelism": config.training.parallelism if facts.world_size > 1 else "none",
        "total_steps": facts.total_steps,
        "warmup_steps": facts.warmup_steps,
        "processes": facts.world_size,
        "effective_batch_size": settings.micro_batch_size * settings.grad_accum * facts.world_size,
        "trainable_parameters": trainable,
        "data_format": facts.data_format,
    }
    dataset = Dataset(id=", ".join(config.data.path), sha256=facts.data_sha256, examples=facts.stats.examples,
                      format=facts.data_format, train_examples=facts.train_examples,
                      eval_examples=facts.eval_examples, tokens=facts.stats.tokens,
                      trained_tokens=facts.stats.trained_tokens, truncated=facts.stats.truncated,
                      dropped=facts.stats.dropped)
    return Lineage(operation="train", method=config.method,
                   parents=[describe_parent(facts.base, "base", hasher=hasher)], recipe=config.as_dict(),
                   parameters=parameters, seed=config.seed, dataset=dataset,
                   parameter_count=trainable, metrics=recorded_metrics(metrics), is_adapter=True)


def merge_into_base(base: ModelRef, adapter: Path, output: Path, *, force: bool, hasher: FileHasher) -> Path:
    """The full model with the adapter folded into the original (16-bit) base, as ``mtool adapters merge`` does."""
    from mtool.adapters.merge import AdapterMergeOptions, merge_adapters

    reference = base.id if base.is_hub else str(base.path)
    return merge_adapters(reference, [str(adapter)], output, AdapterMergeOptions(force=force), hasher=hasher).output
