"""Two processes on CPU (gloo) through torchrun: the same steps as one process accumulating two micro-batches."""

from __future__ import annotations

import json

import pytest
import torch

from mtool.train.config import validate_config
from mtool.train.run import train
from tests.support.train_helpers import alpaca_records, base_config, step_losses, train_with_torchrun, write_jsonl


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(20))
    # dropout on: each micro-batch's masks are seeded by its place in the step, whichever process runs it
    common = {"training.micro_batch_size": 2, "training.max_steps": 3, "lora.dropout": 0.1}
    single = tmp_path / "single"
    train(validate_config(base_config(tiny_llama, data, single, **common, **{"training.grad_accum": 2}), where="t"))
    pair = tmp_path / "pair"
    train_with_torchrun(base_config(tiny_llama, data, pair, **common, **{"training.grad_accum": 1}),
                        tmp_path / "ddp.yaml")
    assert step_losses(pair) == pytest.approx(step_losses(single), rel=1e-5)
    lineage = json.loads((pair / "mtool-lineage.json").read_text())
    assert lineage["parameters"]["processes"] == 2 and lineage["parameters"]["effective_batch_size"] == 4
    expected = load_file(single / "adapter_model.safetensors")
    for name, tensor in load_file(pair / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], atol=2e-6, rtol=1e-4)
