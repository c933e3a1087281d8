"""``mtool train`` and ``mtool estimate``: thin Click commands over :mod:`mtool.train.run` and
:mod:`mtool.train.estimate` (nothing heavy is imported until a command runs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from mtool.sizes import GPU_MEMORY
from mtool.ui import info

# flag (Click parameter name) -> config key it overrides
FLAG_KEYS: dict[str, str] = {
    "base": "base", "out": "out", "data": "data.path", "data_format": "data.format",
    "chat_template": "data.chat_template", "seq_len": "data.seq_len", "packing": "data.packing",
    "eval_fraction": "data.eval_fraction", "train_on_prompt": "data.train_on_prompt",
    "rank": "lora.rank", "alpha": "lora.alpha", "dropout": "lora.dropout", "dora": "lora.dora",
    "rslora": "lora.rslora", "target_modules": "lora.target_modules", "quantization": "model.quantization",
    "compute_dtype": "model.compute_dtype", "epochs": "training.epochs", "max_steps": "training.max_steps",
    "lr": "training.lr", "batch_size": "training.micro_batch_size", "grad_accum": "training.grad_accum",
    "optimizer": "training.optimizer", "schedule": "training.schedule", "warmup_steps": "training.warmup_steps",
    "seed": "seed", "save_every": "checkpoints.every", "merge": "merge",
}

_OPTIONS = [
    click.option("--base", help="Base model: a folder or a Hub id."),
    click.option("--data", multiple=True, help="Training data: JSONL/JSON/Parquet/CSV, a folder, or a datasets "
                                               "folder (repeatable)."),
    click.option("--out", type=click.Path(file_okay=False), help="The adapter folder to write."),
    click.option("--format", "data_format", type=click.Choice(["auto", "alpaca", "chat", "prompt_completion", "text"]),
                 help="Data format (default: detected from the columns)."),
    click.option("--chat-template", help="chatml, llama3, alpaca, mistral, a .jinja file, or Jinja text."),
    click.option("--seq-len", type=int, help="Longest sequence in tokens; longer examples are cut."),
    click.option("--packing/--no-packing", default=None, help="Padding-free packing of examples."),
    click.option("--eval-fraction", type=float, help="Share of the data held out for evaluation."),
    click.option("--train-on-prompt/--no-train-on-prompt", default=None, help="Loss on prompts too."),
    click.option("--rank", type=int, help="LoRA rank r."),
    click.option("--alpha", type=float, help="LoRA alpha (default: the rank)."),
    click.option("--dropout", type=float, help="LoRA dropout."),
    click.option("--dora/--no-dora", default=None, help="Weight-decomposed LoRA."),
    click.option("--rslora/--no-rslora", default=None, help="Rank-stabilized scale alpha/sqrt(r)."),
    click.option("--target-modules", help="Comma-separated module names, or all-linear."),
    click.option("--quantization", type=click.Choice(["nf4", "fp4", "none"]),
                 help="4-bit base (QLoRA) or none (LoRA on a 16/32-bit base)."),
    click.option("--compute-dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"])),
    click.option("--epochs", type=int),
    click.option("--max-steps", type=int, help="Optimizer steps (overrides --epochs)."),
    click.option("--lr", type=float, help="Peak learning rate."),
    click.option("--batch-size", type=int, help="Micro-batch size (examples per forward pass)."),
    click.option("--grad-accum", type=int, help="Micro-batches per optimizer step."),
    click.option("--optimizer", type=click.Choice(["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"])),
    click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"])),
    click.option("--warmup-steps", type=int),
    click.option("--seed", type=int),
    click.option("--save-every", type=int, help="Steps between checkpoints (0: only on Ctrl-C)."),
    click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                 help="Set any config key, e.g. --set lora.dropout=0.05 (repeatable)."),
]


def config_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The config file argument and every override flag, shared by ``train`` and ``estimate``."""
    for option in reversed(_OPTIONS):
        function = option(function)
    return click.argument("config_file", required=False, type=click.Path(exists=True, dir_okay=False))(function)


def resolve_config(config_file: str | None, flags: dict[str, Any]):
    """The validated config: the file (if any), then ``--set`` assignments, then the named flags."""
    from mtool.train.config import load_config, parse_assignment

    overrides: dict[str, Any] = {}
    for text in flags.pop("assignments", ()) or ():
        key, value = parse_assignment(text)
        overrides[key] = value
    for name, value in flags.items():
        if name not in FLAG_KEYS or value is None or value == ():
            continue
        if name == "data":
            value = list(value)
        elif name == "target_modules" and value != "all-linear":
            value = [part.strip() for part in value.split(",") if part.strip()]
        overrides[FLAG_KEYS[name]] = value
    return load_config(config_file, overrides)


@click.command()
@config_options
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint of this run.")
@click.option("--force", is_flag=True, help="Replace an existing output (and earlier checkpoints).")
@click.option("--merge", is_flag=True, default=None, help="Also write the merged model to OUT-merged.")
def train(config_file: str | None, resume: bool, force: bool, **flags: Any) -> None:
    """Fine-tune a causal LM with LoRA / QLoRA.

    CONFIG_FILE is a YAML training config (see recipes/train/); flags override its keys. Runs on one GPU, on
    CPU for small models, or on several GPUs with `torchrun --nproc_per_node N -m mtool.cli train ...` or
    `accelerate launch -m mtool.cli train ...`.
    """
    from mtool.train.run import train as run_training

    config = resolve_config(config_file, flags)
    config.check_trainable()
    result = run_training(config, resume=resume, force=force)
    if result is not None:
        summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.metrics.items())
        info(f"done: {summary}")
        click.echo(str(result.out))


@click.command()
@config_options
@click.option("--gpu-memory", type=GPU_MEMORY, help="Judge the fit against this much memory instead of the "
                                                     "detected GPU: 24 (GiB), 24GiB, 24GB, 8000MB.")
@click.option("--device", "device_type", type=click.Choice(["cuda", "cpu"]),
              help="Estimate for this device (default: cuda, unless training would run on CPU).")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="GPUs the run is launched on (default 1); with --set training.parallelism=fsdp the figure is "
                   "per GPU, and FSDP is suggested when more than one GPU is at hand.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(config_file: str | None, gpu_memory: int | None, device_type: str | None, processes: int | None,
             as_json: bool, **flags: Any) -> None:
    """Predict the peak memory of a training run (per GPU) and whether it fits the GPU.

    Reads only the base model's config.json. Breaks the peak down into weights, LoRA, optimizer states,
    activations and logits, and when it does not fit, lists the settings that make it fit.
    """
    from mtool.hub import resolve_model
    from mtool.train.estimate import estimate_for_config
    from mtool.train.fit import detected_gpu_memory, detected_gpus, fit_report, suggestions

    config = resolve_config(config_file, flags)
    base = resolve_model(config.base, config.model.revision)
    capacity = gpu_memory if gpu_memory else detected_gpu_memory()
    kind = device_type or ("cuda" if capacity is not None else "cpu")
    gpus = max(processes or 1, detected_gpus())
    result = estimate_for_config(config, base.path, device_type=kind, processes=processes or 1)
    if as_json:
        parts = dict(result.estimate.parts())
        data: dict[str, Any] = {"bytes": parts, "total_bytes": result.estimate.total, "device": kind,
                                "capacity_bytes": capacity, "processes": result.run.processes,
                                "sharded": result.run.fsdp}
        if capacity is not None:
            from mtool.train.fit import usable_bytes

            data["fits"] = result.estimate.total <= usable_bytes(capacity)
            data["suggestions"] = [{"change": s.change, "total_bytes": s.total}
                                   for s in suggestions(result.model, result.run, capacity, gpus=gpus)]
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(fit_report(result, capacity, gpus=gpus))
