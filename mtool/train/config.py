"""The training config: a YAML file and/or command-line flags, validated into one typed object.

A config has top-level keys (``base``, ``out``, ``seed``, ``merge``) and five sections::

    base: meta-llama/Llama-3.1-8B        # model folder or Hub id
    out: runs/medic                      # the adapter folder to write
    model:    {quantization: nf4, compute_dtype: auto, gradient_checkpointing: true, ...}
    lora:     {rank: 16, alpha: 16, dropout: 0.0, target_modules: all-linear, dora: false, ...}
    data:     {path: data.jsonl, format: auto, seq_len: 2048, packing: false, ...}
    training: {epochs: 1, micro_batch_size: 2, grad_accum: 4, lr: 2.0e-4, optimizer: adamw_8bit, ...}
    checkpoints: {every: 200, keep: 2}

Flags override the file (``--rank 32``, or any key with ``--set lora.dropout=0.05``). Unknown keys and bad
values are errors that name the key. The resolved config (every default filled in) is printed before training
and saved as ``train-config.yaml`` in the output, so a run can be repeated from its output folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtool.errors import ConfigError, printable, shown
from mtool.safe_yaml import load_yaml, load_yaml_file

CONFIG_FILENAME = "train-config.yaml"

Quantization = Literal["nf4", "fp4", "none"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
DataFormat = Literal["auto", "alpaca", "chat", "prompt_completion", "text"]
OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
ScheduleName = Literal["linear", "cosine", "constant"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """How the base model is loaded and run."""

    quantization: Quantization = "nf4"  # nf4/fp4: QLoRA on a 4-bit base (bitsandbytes); none: plain LoRA
    double_quant: bool = True  # quantize the 4-bit block scales too (~0.4 bit/parameter saved)
    compute_dtype: ComputeDtype = "auto"  # auto: bfloat16 on a GPU that has it, else float16; float32 on CPU
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = True  # non-reentrant; recomputes each layer in the backward pass
    offload_activations: bool = False  # checkpointed layers keep their inputs in host memory (CUDA; see offload.py)
    lean_layers: bool = True  # LoRA layers and fused MLP/q-k-v nodes that keep only what their backward needs
    loss: Literal["chunked", "full"] = "chunked"  # chunked: linear + cross-entropy without the [tokens, vocab] logits
    kernels: Literal["torch", "triton"] = "torch"  # triton: fused 4-bit QLoRA matmul and SwiGLU kernels (CUDA)
    liger: Literal["auto", "on", "off"] = "auto"  # fused Liger kernels: auto = on CUDA when installed
    trust_remote_code: bool = False
    revision: str | None = None  # of a Hub base

    @field_validator("liger", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads a bare on/off as true/false."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class LoraSettings(_Section):
    """The adapter: W' = W + (alpha / r) B A (rsLoRA: alpha / sqrt(r)); DoRA adds a learned magnitude."""

    rank: int = Field(16, gt=0)
    alpha: float | None = Field(None, gt=0)  # None: equal to rank (scale 1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # every linear layer but the output head
    rslora: bool = False
    dora: bool = False
    modules_to_save: list[str] = Field(default_factory=list)  # modules trained in full and saved with the adapter

    @model_validator(mode="after")
    def _alpha_defaults_to_rank(self) -> "LoraSettings":
        if self.alpha is None:
            self.__dict__["alpha"] = float(self.rank)  # shown resolved in the saved config
        return self

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class DataSettings(_Section):
    """Where the examples come from and how they become token sequences."""

    # JSONL/JSON/Parquet/CSV files, a folder of them, or a datasets folder
    path: list[str] = Field(default_factory=list)
    format: DataFormat = "auto"
    split: str = "train"  # the split of a saved DatasetDict
    chat_template: str | None = None  # a built-in name (chatml, llama3, alpaca, mistral), a .jinja file, or Jinja text
    train_on_prompt: bool = False  # loss on every token, not only on responses
    seq_len: int = Field(2048, gt=1)  # longer examples are truncated (and counted)
    packing: bool = False  # padding-free: a micro-batch is one row of whole examples with per-example positions
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # held out from the training data, seeded
    eval_path: list[str] = Field(default_factory=list)  # a separate evaluation set (same formats)
    add_tokens: list[str] = Field(default_factory=list)  # new special tokens (embeddings resized, trained in full)
    max_examples: int | None = Field(None, gt=0)  # use only the first N examples (quick trials)

    _paths = field_validator("path", "eval_path", mode="before")(lambda cls, v: _as_list(v))


class TrainingSettings(_Section):
    """The optimisation loop."""

    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs
    # examples per forward pass (with packing: micro_batch_size * seq_len tokens)
    micro_batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step and process
    lr: float = Field(2e-4, gt=0)
    optimizer: OptimizerName = "adamw_8bit"
    parallelism: Literal["ddp", "fsdp"] = "ddp"  # with several processes: replicate the model, or shard it (FSDP2)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: ScheduleName = "cosine"
    warmup_steps: int | None = Field(None, ge=0)  # None: warmup_ratio of the total steps
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the schedule's floor, as a fraction of lr
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    eval_every: int | None = Field(None, gt=0)  # steps between evaluations (None: at the end only)
    log_every: int = Field(10, gt=0)  # steps between log lines when there is no progress bar

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("betas must lie in [0, 1)")
        return value


class CheckpointSettings(_Section):
    """Periodic training state (adapter, optimizer, schedule and data position) for --resume."""

    every: int = Field(200, ge=0)  # optimizer steps between checkpoints; 0: only on Ctrl-C
    keep: int = Field(2, gt=0)  # the newest N are kept
    dir: str | None = None  # default: <out>-checkpoints beside the output


class TrainConfig(_Section):
    base: str
    out: str | None = None  # required to train (not to estimate)
    seed: int = 42
    merge: bool = False  # also write the merged model to <out>-merged
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)

    @model_validator(mode="after")
    def _fsdp_takes_torch_adamw(self) -> "TrainConfig":
        if self.training.parallelism == "fsdp" and self.training.optimizer != "adamw":
            raise ValueError(f"training.optimizer {self.training.optimizer} keeps bitsandbytes' own state layout, "
                             "which FSDP cannot shard; with training.parallelism fsdp use adamw (its states are "
                             "sharded across the processes)")
        return self

    def check_trainable(self) -> None:
        """Refuse to train without an output folder or data (the estimator needs neither)."""
        if not self.out:
            raise ConfigError("out: missing (required)", where="config", fix="pass --out FOLDER or set out:")
        if not self.data.path:
            raise ConfigError("data.path: missing (required)", where="config",
                              fix="pass --data FILE (JSONL, JSON, Parquet, CSV, a folder of them or a datasets folder)")

    @property
    def checkpoint_dir(self) -> Path:
        if self.checkpoints.dir:
            return Path(self.checkpoints.dir)
        out = Path(self.out or "out")
        return out.with_name(out.name + "-checkpoints")

    @property
    def merged_dir(self) -> Path:
        out = Path(self.out or "out")
        return out.with_name(out.name + "-merged")

    @property
    def method(self) -> str:
        """The lineage method: ``qlora`` on a quantized base, else ``lora``."""
        return "lora" if self.model.quantization == "none" else "qlora"

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False, default_flow_style=None)


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return value


# Run-time switches that may differ between a run and its resumption without changing what is computed. The
# split of a step's micro-batches between processes and accumulation (grad_accum, parallelism) may change too,
# as long as the micro-batches per step stay the same (checked with the process count by the resuming run).
RESUME_TOLERANT_KEYS = frozenset({"checkpoints.every", "checkpoints.keep", "training.log_every", "training.eval_every",
                                  "merge", "out", "training.grad_accum", "training.parallelism",
                                  "model.offload_activations", "model.kernels"})


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_key(d, "lora.rank", 32)``: assign a nested key, creating sections as needed."""
    *sections, last = dotted.split(".")
    node = data
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {section!r} is not a section", where="--set")
        node = child
    node[last] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"lora.dropout=0.05"`` -> ``("lora.dropout", 0.05)``; the value is read as YAML (numbers, lists, true)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"cannot read {text!r}", where="--set", fix="write KEY=VALUE, e.g. --set lora.dropout=0.05")
    try:
        value = load_yaml(raw, source="--set").data if raw.strip() else None
    except ConfigError:  # not YAML (or beyond its limits): the text as it is
        value = raw
    return key.strip(), value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML config file (an empty file is an empty mapping), read within
    :mod:`mtool.safe_yaml`'s limits (size, depth, aliases, duplicate keys)."""
    data = load_yaml_file(path, what="config").data
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of keys to values", where=str(path),
                          fix="see recipes/train/ for examples")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                where: str | None = None) -> TrainConfig:
    """Read ``path`` (optional), apply ``overrides`` (dotted keys -> values, None values skipped) and validate.

    Relative paths are relative to the working directory (as in mergekit and Axolotl), not to the file.
    """
    data = read_config_file(path) if path else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_key(data, key, value)
    return validate_config(data, where=where or (str(path) if path else "command line"))


def validate_config(data: dict[str, Any], *, where: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = printable(".".join(str(part) for part in first["loc"])[:200]) or "config"
        message = printable(first["msg"].removeprefix("Value error, "))[:300]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "missing (required)"
        elif "input" in first and first["type"] not in ("value_error",):
            message = f"{message} (got {shown(first['input'])})"
        raise ConfigError(f"{key}: {message}", where=where,
                          fix="see docs/train.md for every key and its allowed values") from None


def resume_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """Keys whose values differ between a checkpoint's config and the current one (tolerated keys aside)."""
    before, after = _flatten(saved.as_dict()), _flatten(current.as_dict())
    keys = sorted(set(before) | set(after))
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys
            if k not in RESUME_TOLERANT_KEYS and before.get(k) != after.get(k)]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
