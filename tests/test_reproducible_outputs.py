"""SOURCE_DATE_EPOCH: whole output folders (weights, config, tokenizer, lineage record, card, metrics) byte for byte
the same across reruns into the same folder; training too, across Python hash seeds (PEFT writes target_modules
from a set)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EPOCH = "1700000000"
CREATED = "2023-11-14T22:13:20+00:00"  # datetime.fromtimestamp(1700000000, timezone.utc).isoformat()
REPO = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_merge_and_adapter_merge_folders_are_identical(tiny, tmp_path, run_cli, monkeypatch) -> None:
    base = tiny.model("llama")
    tuned = tiny.finetune(base, seed=3)
    adapter = tiny.lora(base, rank=4)
    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {tuned}\n"
                      "parameters:\n  t: 0.3\n")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    for name, argv in (("merge", ["merge", recipe]), ("adapter-merge", ["adapters", "merge", base, adapter])):
        out = tmp_path / name  # a rerun writes the same folder (its name can be the card's model name)
        run_cli("-q", *argv, out)
        first = out.rename(tmp_path / f"{name}-first")
        run_cli("-q", *argv, out)
        assert folder_bytes(first) == folder_bytes(out), name
        record = json.loads((out / "mtool-lineage.json").read_text())
        assert record["created"] == CREATED and CREATED in (out / "README.md").read_text()


def test_an_invalid_source_date_epoch_is_refused(tiny, tmp_path, run_cli, monkeypatch) -> None:
    base = tiny.model("llama")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    result = run_cli("adapters", "merge", base, tiny.lora(base, rank=4), tmp_path / "out", expect=2)
    assert "SOURCE_DATE_EPOCH must be a Unix time in whole seconds, got 'yesterday'" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_folders_are_identical_across_hash_seeds(tiny, tmp_path) -> None:
    """Two processes with different PYTHONHASHSEED (so PEFT's set of target modules comes out in another order)
    train the same run into the same path: the folders are identical, measurements of the run left out."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"The capital of country {i} is city {i}."}) + "\n"
                            for i in range(8)))
    out = tmp_path / "adapter"
    argv = [sys.executable, "-m", "mtool.cli", "-q", "train", "--base", str(tiny.model("llama")), "--data", str(data),
            "--out", str(out), "--quantization", "none", "--compute-dtype", "float32", "--optimizer", "adamw",
            "--rank", "2", "--max-steps", "3", "--seed", "5"]
    folders = []
    for seed in ("1", "2"):
        env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": "1"}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        folders.append(out.rename(tmp_path / f"run-{seed}"))
        shutil.rmtree(tmp_path / "adapter-checkpoints")
    first, second = (folder_bytes(folder) for folder in folders)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name
    config = json.loads(first["adapter_config.json"])
    assert config["target_modules"] == sorted(config["target_modules"]) and len(config["target_modules"]) > 1
    rows = [json.loads(line) for line in first["metrics.jsonl"].decode().splitlines()]
    assert len(rows) == 3 and not any({"elapsed_s", "tokens_per_s", "memory_gib"} & set(row) for row in rows)
    record = json.loads(first["mtool-lineage.json"])
    assert record["created"] == CREATED and "train_seconds" not in record["metrics"]
