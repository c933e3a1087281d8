"""The model under training: checkpointing gradients, packed attention, and the memory estimate."""

from __future__ import annotations

import pytest
import torch

from mtool.train.batching import collate
from mtool.train.config import load_config
from mtool.train.model import build_model
from mtool.train.tokenizer import load_tokenizer
from tests.support.train_helpers import measured_and_estimated_peak

CPU = torch.device("cpu")


def settings(base, **overrides):
    values = {"base": str(base), "model.quantization": "none", "model.compute_dtype": "float32", "lora.rank": 4}
    values.update(overrides)
    return load_config(None, values)


def lora_model(base, **overrides):
    config = settings(base, **overrides)
    model, _ = build_model(str(base), load_tokenizer(str(base)), config.model, config.lora, device=CPU, seed=0)
    with torch.no_grad():  # B starts at zero: give it values so that every LoRA matrix gets a gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(tiny_llama):
    batch = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    gradients = []
    for checkpointing in (False, True):
        model = lora_model(tiny_llama, **{"model.gradient_checkpointing": checkpointing})
        model.train()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = gradients
    assert len(plain) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name, gradient in checkpointed.items():
        assert gradient is not None and gradient.abs().sum() > 0, name
        torch.testing.assert_close(gradient, plain[name], rtol=1e-5, atol=1e-7)


def test_packed_and_padded_losses_agree_and_nothing_attends_across_examples(tiny_llama):
    model = lora_model(tiny_llama)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in (7, 12, 5):
        ids = torch.randint(0, 380, (length,), generator=generator).tolist()
        labels = [-100] * (length // 2) + ids[length // 2:]
        examples.append({"input_ids": ids, "labels": labels})
    padded = collate(examples, packing=False, pad_id=3)
    packed = collate(examples, packing=True, pad_id=3)
    assert padded.trained == packed.trained
    with torch.no_grad():
        loss_padded = model(**padded.inputs, use_cache=False).loss
        loss_packed = model(**packed.inputs, use_cache=False).loss
        logits = model(**packed.inputs, use_cache=False).logits
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]]), use_cache=False).logits
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits[0, 7:19], alone[0], rtol=1e-4, atol=1e-5)  # the middle example, as if alone
    with torch.no_grad():  # the same row read as one sequence (no position ids) mixes the examples
        joined = model(input_ids=packed.inputs["input_ids"], labels=packed.inputs["labels"], use_cache=False).loss
    assert abs(float(joined) - float(loss_packed)) > 1e-3


@pytest.mark.parametrize("overrides", [
    {"model.gradient_checkpointing": True},
    {"model.gradient_checkpointing": False},
    {"model.gradient_checkpointing": True, "model.quantization": "nf4"},
])
def test_estimate_within_15_percent_of_the_measured_peak(tiny, tmp_path, overrides):
    base = tiny.model("llama", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4,
                      vocab_size=4096)
    measured, estimate = measured_and_estimated_peak(base, **overrides)
    assert abs(estimate.total / measured - 1) < 0.15, (estimate.parts(), measured)


def test_estimate_command_verdict_and_suggestions(tmp_path, run_cli):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **shape}))
    with torch.device("meta"):
        reference = LlamaForCausalLM(LlamaConfig(**shape))
    linear = sum(m.weight.numel() for n, m in reference.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    other = sum(p.numel() for p in reference.parameters()) - linear
    args = ["estimate", "--base", tmp_path, "--seq-len", "2048", "--batch-size", "2", "--rank", "16", "--json"]
    small = json.loads(run_cli(*args, "--gpu-memory", "8GiB").output)
    expected_weights = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + other * 2  # NF4 + double quant, bf16 rest
    assert small["bytes"]["weights"] == pytest.approx(expected_weights, rel=1e-6)
    lora = sum(16 * (m.in_features + m.out_features) for n, m in reference.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert small["bytes"]["LoRA parameters + gradients"] == lora * 8
    assert small["fits"] is False and small["suggestions"]
    usable = (8 * 2**30 - 0.6 * 2**30) / 1.08
    assert small["suggestions"][-1]["total_bytes"] <= usable  # the suggested settings do fit
    assert json.loads(run_cli(*args, "--gpu-memory", "80GiB").output)["fits"] is True
    text = run_cli(*args[:-1], "--gpu-memory", "8GiB").output
    assert "does NOT fit" in text and "try --batch-size 1" in text


def test_gpu_memory_in_bare_gib_and_cumulative_accumulation_advice(tmp_path, run_cli):
    import json

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **shape}))
    args = ["estimate", "--base", tmp_path, "--seq-len", "2048", "--batch-size", "8", "--rank", "16"]
    bare = json.loads(run_cli(*args, "--json", "--gpu-memory", "24").output)
    assert bare["capacity_bytes"] == 24 * 2**30  # a bare number is GiB: "a 24 GB card"
    assert json.loads(run_cli(*args, "--json", "--gpu-memory", "24GB").output)["capacity_bytes"] == 24 * 10**9
    text = run_cli(*args, "--gpu-memory", "7", "--set", "model.gradient_checkpointing=false").output
    advice = [line for line in text.splitlines() if "--grad-accum" in line]
    # each halving keeps the earlier ones: batch 8 -> 2 needs 4 micro-batches per step for the same effective batch
    assert ["--batch-size 4 --grad-accum x2 " in advice[0], "--batch-size 2 --grad-accum x4 " in advice[1],
            "--batch-size 1 --grad-accum x8 " in advice[2]] == [True, True, True]
