"""``mtool adapters inspect``: the summary read from an adapter's config and headers, and the --base check."""

from __future__ import annotations

import json

from tests.support.peft_adapters import make_peft_adapter


def test_inspect_describes_a_dora_adapter(tiny, tmp_path, run_cli):
    base = tiny.model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", r=8, lora_alpha=16, use_dora=True, use_rslora=True,
                                target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4},
                                modules_to_save=["lm_head"])
    data = json.loads(run_cli("adapters", "inspect", adapter, "--json").output)
    assert data["variant"] == "rsLoRA + DoRA"
    assert data["ranks"] == {"4": 2, "8": 2} and data["rank"] == 8 and data["alpha"] == 16
    assert data["scales"] == {f"{16 / 4 ** 0.5:g}": 2, f"{16 / 8 ** 0.5:g}": 2}
    assert data["target_modules"] == ["q_proj", "v_proj"] and data["modules"] == 4
    assert data["modules_to_save"] == ["lm_head"]
    # A and B of q_proj (8x64 + 64x8) and v_proj (4x64 + 32x4), 4 magnitude vectors, the lm_head copy
    expected = 2 * (8 * 64 + 64 * 8) + 2 * (4 * 64 + 32 * 4) + 2 * 64 + 2 * 32 + 384 * 64
    assert data["trainable_parameters"] == expected
    assert data["dtypes"] == {"F32": 13}
    assert data["base_model"] == str(base)
    assert data["size_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    text = run_cli("adapters", "inspect", adapter).output
    assert "rsLoRA + DoRA" in text and "modules_to_save:  lm_head" in text


def test_inspect_checks_the_base(tiny, tmp_path, run_cli):
    base = tiny.model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"])
    fits = json.loads(run_cli("adapters", "inspect", adapter, "--base", base, "--json").output)
    assert fits["base_check"] == {"base": str(base), "checked": 4, "problems": [], "compatible": True}
    other = tiny.model("llama", intermediate_size=96)
    result = run_cli("adapters", "inspect", adapter, "--base", other, expect=1)
    assert "NOT compatible" in result.output
    assert "model.layers.0.mlp.down_proj.weight is [64, 96] in the base but [64, 128] in the adapter" in result.output
    assert "q_proj" not in result.output.split("NOT compatible")[1]
