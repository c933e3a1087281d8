"""The memory modes together: lean layers, fused blocks, the chunked loss and offloaded checkpointing give the
plain stack's loss and gradients for LoRA, QLoRA, DoRA and rsLoRA, and the training loop's losses."""

from __future__ import annotations

import json

import pytest
import torch

from mtool.train.config import load_config, validate_config
from mtool.train.model import build_model
from mtool.train.offload import ActivationOffloader, offload_checkpointed_layers
from mtool.train.run import train
from mtool.train.tokenizer import load_tokenizer
from tests.support.train_helpers import alpaca_records, base_config, write_jsonl

CPU = torch.device("cpu")
VARIANTS = {
    "lora": {},
    "qlora": {"model.quantization": "nf4"},
    "dora": {"lora.dora": True},
    "rslora": {"lora.rslora": True, "lora.alpha": 16},
}


def _model(base, *, lean: bool, **overrides):
    values = {"base": str(base), "model.quantization": "none", "model.compute_dtype": "float32", "lora.rank": 4,
              "lora.alpha": 8, "model.gradient_checkpointing": True, "model.lean_layers": lean,
              "model.loss": "chunked" if lean else "full", **overrides}
    config = load_config(None, values)
    model, modes = build_model(str(base), load_tokenizer(str(base)), config.model, config.lora, device=CPU, seed=0)
    with torch.no_grad():  # B = 0 at start; give every adapter a non-zero update so every path matters
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model, modes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_modes_together_give_the_plain_gradients(tiny_llama, variant):
    ids = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    results = []
    for lean in (False, True):
        model, modes = _model(tiny_llama, lean=lean, **VARIANTS[variant])
        offloader = ActivationOffloader(min_bytes=0, copy_on_cpu=True)
        if lean:
            assert modes.loss == "chunked" and modes.lean_layers == 14
            assert (modes.fused_mlps, modes.fused_attention) == ((0, 0) if variant == "dora" else (2, 2))
            assert offload_checkpointed_layers(model, offloader) == 2
        model.train()
        output = model(input_ids=ids, labels=labels, num_items_in_batch=int((labels[:, 1:] != -100).sum()))
        output.loss.backward()
        results.append((output.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        if lean:
            assert offloader.offloaded_bytes == 2 * ids.numel() * 64 * 4  # each layer's input, float32
    (plain_loss, plain), (lean_loss, lean) = results
    torch.testing.assert_close(lean_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert lean.keys() == plain.keys()
    for name, gradient in plain.items():
        torch.testing.assert_close(lean[name], gradient, rtol=1e-4, atol=1e-6)


def test_offloaded_inputs_come_back_in_reverse_order_and_are_fetched_ahead():
    layers = torch.nn.ModuleList(torch.nn.Linear(8, 8).double() for _ in range(4))
    offloader = ActivationOffloader(min_bytes=0, copy_on_cpu=True)
    fetched: list[int] = []
    original = offloader._fetch

    def fetch(record):
        fetched.append(id(record))
        original(record)

    offloader._fetch = fetch
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    reference = x
    for layer in layers:
        reference = torch.tanh(layer(reference))
    reference.sum().backward()
    expected = [p.grad.clone() for p in layers.parameters()]
    layers.zero_grad()
    hidden = x
    for layer in layers:
        hidden = offloader.checkpoint(lambda value, module=layer: torch.tanh(module(value)), hidden)
    hidden.sum().backward()
    for got, want in zip((p.grad for p in layers.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert offloader.offloaded_bytes == 4 * 3 * 8 * 8
    assert len(fetched) == 4  # each input fetched once: the last on demand, the others ahead of their layer


def test_training_losses_are_the_same_with_and_without_the_memory_modes(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(16))
    curves = {}
    for lean in (False, True):
        out = tmp_path / f"lean-{lean}"
        train(validate_config(base_config(tiny_llama, data, out, **{
            "model.lean_layers": lean, "model.loss": "chunked" if lean else "full",
            "model.gradient_checkpointing": True, "training.max_steps": 4, "data.eval_fraction": 0.25}), where="t"))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[lean] = [row["loss"] for row in rows if "loss" in row] + [row["eval_loss"] for row in rows
                                                                          if "eval_loss" in row]
        lineage = json.loads((out / "mtool-lineage.json").read_text())
        assert lineage["parameters"]["loss"] == ("chunked" if lean else "full")
        assert lineage["parameters"]["lean_layers"] is lean
    assert curves[True] == pytest.approx(curves[False], rel=1e-5)


def test_offloading_needs_checkpointing(tiny_llama):
    from mtool.errors import ConfigError

    with pytest.raises(ConfigError, match="needs gradient checkpointing"):
        _model(tiny_llama, lean=True, **{"model.gradient_checkpointing": False, "model.offload_activations": True})
    with pytest.raises(ConfigError, match="CUDA"):
        _model(tiny_llama, lean=True, **{"model.kernels": "triton"})
