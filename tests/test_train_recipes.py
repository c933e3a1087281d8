"""Every example training config in recipes/train runs: two optimizer steps on a tiny model, its own settings
(format, packing, quantization, chat template, rsLoRA/DoRA) unchanged; paged optimizers, which need
a GPU, run as their unpaged twin; only the base, the data, the
output and the sizes are pointed at the tiny stand-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtool.lineage import read_lineage
from mtool.train.config import load_config
from tests.support.train_helpers import alpaca_records, chat_records, write_jsonl

RECIPES = sorted((Path(__file__).parents[1] / "recipes" / "train").glob("*.yaml"))


def _records(data_format: str) -> list[dict]:
    if data_format == "alpaca":
        return alpaca_records(8)
    if data_format == "chat":
        return chat_records(8)
    if data_format == "prompt_completion":
        return [{"prompt": r["instruction"], "completion": r["output"]} for r in alpaca_records(8)]
    return [{"text": r["instruction"] + " " + r["output"]} for r in alpaca_records(8)]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_training_recipe_runs(recipe: Path, tiny_llama: Path, run_cli, tmp_path: Path) -> None:
    config = load_config(recipe)
    data = write_jsonl(tmp_path / "data.jsonl", _records(config.data.format))
    out = tmp_path / "adapter"
    # paged optimizers move their state between GPU and CPU memory: on a CPU-only machine, their unpaged twin
    optimizer = config.training.optimizer
    cpu_only = ["--optimizer", optimizer.removeprefix("paged_")] if optimizer.startswith("paged_") else []
    run_cli("-q", "train", recipe, "--base", tiny_llama, "--data", data, "--out", out, "--max-steps", "2",
            "--batch-size", "2", "--grad-accum", "1", "--seq-len", "64", "--save-every", "0",
            "--set", "data.eval_path=[]", "--set", f"checkpoints.dir={tmp_path / 'checkpoints'}", *cpu_only)
    record = read_lineage(out)
    assert record is not None and record.operation == "train"
    assert record.method == config.method  # the recipe's own quantization decides LoRA vs QLoRA
    assert record.metrics["steps"] == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
