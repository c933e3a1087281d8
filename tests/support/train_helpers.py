"""Small training data sets and configs for the ``tests/test_train_*.py`` tests (written on the spot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtool.train.config import set_key

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Canada", "Ottawa")]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def alpaca_records(count: int) -> list[dict[str, str]]:
    return [{"instruction": f"What is the capital of {country}?", "input": "" if i % 2 else "Answer briefly.",
             "output": f"The capital of {country} is {city}."}
            for i, (country, city) in enumerate(CAPITALS[i % len(CAPITALS)] for i in range(count))]


def chat_records(count: int) -> list[dict[str, Any]]:
    records = []
    for i in range(count):
        country, city = CAPITALS[i % len(CAPITALS)]
        records.append({"messages": [{"role": "user", "content": f"Capital of {country}?"},
                                     {"role": "assistant", "content": f"{city}."},
                                     {"role": "user", "content": "Reverse the string: abc"},
                                     {"role": "assistant", "content": "cba"}]})
    return records


def base_config(base: Path, data: Path | list[Path], out: Path, **overrides: Any) -> dict[str, Any]:
    """A small, fast, deterministic training config (plain LoRA, float32, AdamW); ``overrides`` are dotted keys."""
    config: dict[str, Any] = {
        "base": str(base), "out": str(out), "seed": 7,
        "model": {"quantization": "none", "compute_dtype": "float32", "gradient_checkpointing": False},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"path": [str(p) for p in (data if isinstance(data, list) else [data])], "seq_len": 64},
        "training": {"micro_batch_size": 4, "lr": 1e-2, "optimizer": "adamw", "max_steps": 6, "warmup_steps": 0,
                     "schedule": "constant"},
        "checkpoints": {"every": 0},
    }
    for dotted, value in overrides.items():
        set_key(config, dotted, value)
    return config


def step_losses(folder: Path) -> list[float]:
    """The training losses of a run's ``metrics.jsonl``, step by step."""
    rows = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    return [row["loss"] for row in rows if "loss" in row]


def train_with_torchrun(config: dict[str, Any], config_path: Path, processes: int = 2) -> None:
    """Train ``config`` (written to ``config_path``) in ``processes`` CPU processes (gloo) through torchrun."""
    import os
    import subprocess
    import sys

    import yaml

    config_path.write_text(yaml.safe_dump(config))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         "-m", "mtool.cli", "-q", "train", str(config_path)],
        env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]


def measured_and_estimated_peak(base: Path, **overrides: Any) -> tuple[int, Any]:
    """One training step of a small float32 LoRA config on ``base`` (2 x 128 tokens, AdamW, ``overrides`` as
    dotted keys): the measured peak of allocated bytes and :func:`estimate_for_config`'s estimate."""
    import torch

    from mtool.train.config import load_config
    from mtool.train.estimate import estimate_for_config
    from mtool.train.measure import measure_peak_bytes
    from mtool.train.model import build_model, trainable_parameters
    from mtool.train.optim import build_optimizer
    from mtool.train.tokenizer import load_tokenizer

    cpu = torch.device("cpu")
    config = load_config(None, {"base": str(base), "model.quantization": "none", "model.compute_dtype": "float32",
                                "lora.rank": 8, "training.optimizer": "adamw", "training.micro_batch_size": 2,
                                "data.seq_len": 128, **overrides})
    model, _ = build_model(str(base), load_tokenizer(str(base)), config.model, config.lora, device=cpu, seed=0)
    optimizer = build_optimizer(trainable_parameters(model), config.training, cpu)
    batch = torch.randint(0, 380, (2, 128), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch,
                     num_items_in_batch=batch.numel(), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer states exist from the first step on
    resident = list(model.parameters()) + list(model.buffers())
    resident += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return measure_peak_bytes(step, resident, cpu), estimate_for_config(config, base, device_type="cpu").estimate
