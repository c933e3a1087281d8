"""The memory estimate with the memory modes: against the measured peak (CPU), the per-GPU figure under FSDP,
offloaded checkpointing, and the suggestions that recommend them."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from mtool.train.config import load_config
from mtool.train.estimate import ModelShape, estimate_memory, layer_weight_bytes, run_shape
from mtool.train.fit import suggestions, usable_bytes
from tests.support.train_helpers import measured_and_estimated_peak

LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


@pytest.mark.parametrize("overrides", [
    {"model.lean_layers": False},
    {"model.loss": "full"},
    {"model.gradient_checkpointing": False},
    {"lora.dropout": 0.1},
    {"lora.dora": True},
])
def test_estimate_of_each_mode_within_15_percent_of_the_measured_peak(tiny, overrides):
    base = tiny.model("llama", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4,
                      vocab_size=4096)
    measured, estimate = measured_and_estimated_peak(base, **overrides)
    assert abs(estimate.total / measured - 1) < 0.15, (estimate.parts(), measured)


def _shape() -> ModelShape:
    return ModelShape.from_config(LLAMA_70B, "test")


def _run(**overrides):
    config = load_config(None, {"base": "x", "data.seq_len": 2048, "training.micro_batch_size": 1,
                                "training.optimizer": "adamw", **overrides})
    return run_shape(config, device_type="cuda", liger_available=False)


def test_fsdp_figure_is_a_shard_plus_two_gathered_layers():
    model = _shape()
    single = estimate_memory(model, _run())
    sharded_run = replace(_run(**{"training.parallelism": "fsdp"}), processes=4, fsdp=True)
    sharded = estimate_memory(model, sharded_run)
    one_layer = sum(i * o for i, o in model.linear_shapes().values()) * (0.5 + 1 / 64 + 4 / (64 * 256)) \
        + 2 * model.hidden * 2
    assert layer_weight_bytes(model, sharded_run) == math.ceil(one_layer)
    assert sharded.weights == math.ceil(single.weights / 4) + 2 * math.ceil(one_layer)
    assert sharded.lora == math.ceil(single.lora / 4) and sharded.optimizer == math.ceil(single.optimizer / 4)
    assert (sharded.activations, sharded.logits) == (single.activations, single.logits)


def test_offloading_keeps_two_layer_inputs_on_the_gpu():
    model = _shape()
    kept = estimate_memory(model, _run())
    offloaded = estimate_memory(model, _run(**{"model.offload_activations": True}))
    assert kept.activations - offloaded.activations == (model.layers - 2) * 2048 * model.hidden * 2
    cpu = run_shape(load_config(None, {"base": "x", "model.offload_activations": True}), device_type="cpu",
                    liger_available=False)
    assert not cpu.offload  # on a CPU nothing moves


def test_a_70b_qlora_fits_two_24_gib_gpus_through_fsdp_and_offloading():
    model = _shape()
    capacity = 24 * 2**30
    run = _run(**{"training.optimizer": "adamw_8bit", "lora.rank": 8})  # r=16 needs 1024-token sequences
    alone = suggestions(model, run, capacity, gpus=1)
    assert not any("fsdp" in s.change for s in alone)
    pair = suggestions(model, run, capacity, gpus=2)
    changes = [s.change for s in pair]
    assert any("offload_activations" in c for c in changes) and any("parallelism=fsdp" in c for c in changes)
    assert pair[-1].total <= usable_bytes(capacity)
    assert not any("--seq-len" in c or "--batch-size" in c for c in changes)  # no shorter context needed


def test_estimate_command_reports_the_per_gpu_figure(tmp_path, run_cli):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **LLAMA_70B}))
    args = ["estimate", "--base", tmp_path, "--seq-len", "2048", "--batch-size", "1", "--gpu-memory", "24GiB",
            "--json"]
    single = json.loads(run_cli(*args).output)
    sharded = json.loads(run_cli(*args, "--processes", "2", "--optimizer", "adamw",
                                 "--set", "training.parallelism=fsdp").output)
    assert sharded["sharded"] and sharded["processes"] == 2 and not single["sharded"]
    assert sharded["bytes"]["weights"] < 0.6 * single["bytes"]["weights"]
    assert any("parallelism=fsdp" in s["change"] for s in json.loads(
        run_cli(*args, "--processes", "2").output)["suggestions"])
