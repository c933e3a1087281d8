"""``mtool adapters extract`` (SVD of TUNED - BASE) and ``resize`` (SVD of B @ A): round trips through LoRA
adapters, errors against float64 references, and the folders loading in PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from mtool.io.reading import open_checkpoint
from mtool.lineage import read_lineage
from mtool.lora.adapter import load_lora
from tests.support.peft_adapters import load_model, logits, make_peft_adapter, peft_model, relative

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def lora_pair(tiny, tmp_path_factory):
    """A base, a rank-4 adapter on every linear layer and the embedding, and base + adapter merged."""
    base = tiny.model("llama")
    folder = tmp_path_factory.mktemp("extract")
    adapter = make_peft_adapter(base, folder / "lora", seed=5, r=4, lora_alpha=8, use_rslora=True,
                                target_modules=TARGETS)
    from click.testing import CliRunner

    from mtool.cli import main

    result = CliRunner().invoke(main, ["adapters", "merge", str(base), str(adapter), str(folder / "tuned")])
    assert result.exit_code == 0, result.output
    return base, adapter, folder / "tuned"


def _delta(adapter, name: str) -> torch.Tensor:
    return adapter.delta_for(name).double()


def test_extract_recovers_a_lora_at_its_rank(lora_pair, tmp_path, run_cli):
    base, adapter, tuned = lora_pair
    out = tmp_path / "extracted"
    result = run_cli("adapters", "extract", base, tuned, out, "--rank", "4")
    assert "overall: 16 modules, rank 4, relative error" in result.output
    original, extracted = load_lora(adapter), load_lora(out)
    assert set(extracted.targets) == set(original.targets)
    assert extracted.targets["model.embed_tokens.weight"].is_embedding
    for name in original.targets:
        assert extracted.targets[name].rank == 4
        assert relative(extracted.delta_for(name), _delta(original, name)) <= 2e-5, name
    record = read_lineage(out)
    assert record.operation == "extract" and record.is_adapter and record.metrics["relative_error"] < 1e-5
    # PEFT loads it onto the base and reproduces the tuned model
    assert torch.allclose(logits(peft_model(base, [out])), logits(load_model(tuned)), atol=1e-4)


def test_extract_of_a_full_finetune_reports_the_truncation_error(tiny, tmp_path, run_cli):
    base = tiny.model("llama")
    tuned = tiny.finetune(base, seed=3)
    out = tmp_path / "x"
    result = run_cli("adapters", "extract", base, tuned, out, "--rank", "8")
    assert "changed tensors are not 2-D weights" in result.output  # the norms changed too
    extracted = load_lora(out)
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    errors, norms = 0.0, 0.0
    for name, module in extracted.targets.items():
        delta = tuned_ckpt.read(name).double() - base_ckpt.read(name).double()
        matrix = delta.T if module.is_embedding else delta
        singular = torch.linalg.svdvals(matrix)
        best = float(singular[8:].square().sum().sqrt() / singular.square().sum().sqrt())  # Eckart-Young
        approximation = extracted.delta_for(name).double()
        achieved = relative(approximation, delta)
        assert achieved == pytest.approx(best, rel=1e-4), name
        reported = read_lineage(out).metrics["modules"][module.module]["relative_error"]
        assert reported == pytest.approx(best, rel=1e-4)
        errors += float((approximation - delta).square().sum())
        norms += float(delta.square().sum())
    assert read_lineage(out).metrics["relative_error"] == pytest.approx((errors / norms) ** 0.5, rel=1e-4)


def test_extract_energy_and_full_rank_round_trip(tiny, tmp_path, run_cli):
    base = tiny.model("llama")
    tuned = tiny.finetune(base, seed=4)
    run_cli("adapters", "extract", base, tuned, tmp_path / "e", "--energy", "0.9")
    extracted = load_lora(tmp_path / "e")
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    for name, module in extracted.targets.items():
        delta = tuned_ckpt.read(name).double() - base_ckpt.read(name).double()
        energy = torch.cumsum(torch.linalg.svdvals(delta).square(), 0) / delta.square().sum()
        assert module.rank == int((energy < 0.9).sum()) + 1, name
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    assert peft_model(base, [tmp_path / "e"]) is not None  # per-module ranks load in PEFT
    # at full rank with the changed norms kept whole, the adapter reproduces the fine-tune exactly
    run_cli("adapters", "extract", base, tuned, tmp_path / "full", "--rank", "128", "--keep-other")
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["modules_to_save"]
    assert torch.allclose(logits(peft_model(base, [tmp_path / "full"])), logits(load_model(tuned)), atol=1e-4)


def test_resize_to_the_same_rank_is_lossless_and_lower_rank_is_optimal(lora_pair, tmp_path, run_cli):
    _, adapter, _ = lora_pair
    result = run_cli("adapters", "resize", adapter, tmp_path / "same", "--rank", "4")
    assert "overall: 16 modules, rank 4, relative error" in result.output
    original, same = load_lora(adapter), load_lora(tmp_path / "same")
    for name in original.targets:
        assert relative(same.delta_for(name), _delta(original, name)) <= 1e-6, name
    assert read_lineage(tmp_path / "same").metrics["relative_error"] <= 1e-6

    run_cli("adapters", "resize", adapter, tmp_path / "low", "--rank", "2")
    low = load_lora(tmp_path / "low")
    for name in original.targets:
        delta = _delta(original, name)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert low.targets[name].rank == 2
        assert relative(low.delta_for(name), best) <= 1e-5, name
    expected = read_lineage(tmp_path / "low").metrics["modules"]["model.layers.0.mlp.up_proj"]["relative_error"]
    delta = _delta(original, "model.layers.0.mlp.up_proj.weight")
    singular = torch.linalg.svdvals(delta)
    assert expected == pytest.approx(float(singular[2:].norm() / singular.norm()), rel=1e-4)


def test_resize_keeps_dora_magnitudes_and_modules_to_save(tiny, tmp_path, run_cli):
    base = tiny.model("llama")
    adapter = make_peft_adapter(base, tmp_path / "d", r=4, lora_alpha=16, use_dora=True, target_modules=["q_proj"],
                                modules_to_save=["lm_head"])
    run_cli("adapters", "resize", adapter, tmp_path / "r", "--rank", "4")
    config = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["lora_alpha"] == config["r"] == 4
    assert torch.allclose(logits(peft_model(base, [tmp_path / "r"])), logits(peft_model(base, [adapter])), atol=2e-5)


def test_extract_and_resize_bad_inputs(tiny, lora_pair, tmp_path, run_cli):
    base, adapter, tuned = lora_pair
    out = tmp_path / "out"
    other = tiny.model("llama", hidden_size=32, intermediate_size=64)
    assert "lm_head.weight is [384, 64] in BASE but [384, 32] in TUNED" in run_cli("adapters", "extract", base, other,
                                                                                   out, "--rank", 2, expect=2).output
    assert "exactly one of --rank and --energy" in run_cli("adapters", "extract", base, tuned, out, expect=2).output
    assert "--energy must be in (0, 1]" in run_cli("adapters", "extract", base, tuned, out, "--energy", "1.5",
                                                    expect=2).output
    assert "nothing to extract" in run_cli("adapters", "extract", base, base, out, "--rank", 2, expect=2).output
    assert "not a model" in run_cli("adapters", "extract", base, adapter, out, "--rank", 2, expect=2).output
    assert "positive integer" in run_cli("adapters", "resize", adapter, out, "--rank", "0", expect=2).output
    assert "adapter_config.json is missing" in run_cli("adapters", "resize", base, out, "--rank", "2",
                                                       expect=2).output
    above = run_cli("adapters", "resize", adapter, out, "--rank", "8", expect=2).output  # the adapter has rank 4
    assert "above the adapter's largest rank 4" in above and "give a rank below 4" in above
    assert not out.exists()


def test_a_base_that_is_an_adapter_names_its_base(tiny, lora_pair, tmp_path, run_cli):
    base, adapter, _ = lora_pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    expected = f"its base model is {config['base_model_name_or_path']}"
    for args in (("adapters", "merge", adapter, adapter, tmp_path / "o"),
                 ("adapters", "inspect", adapter, "--base", adapter),
                 ("estimate", "--base", adapter),
                 ("train", "--base", adapter, "--data", adapter / "adapter_config.json", "--out", tmp_path / "t")):
        output = run_cli(*args, expect=2).output
        assert "this is a LoRA adapter" in output and expected in output, args
