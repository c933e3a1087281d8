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
