"""``mtool adapters merge`` against PEFT's ``merge_and_unload`` and against the adapter model's own logits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtool.io.hashing import sha256_of_file
from mtool.io.reading import open_checkpoint
from mtool.lineage import read_lineage
from tests.support.peft_adapters import load_model, logits, make_peft_adapter, peft_model, relative

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (base, LoraConfig keyword arguments)
CASES: dict[str, tuple[str, dict]] = {
    "lora": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_rslora=True)),
    "dora": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_dora=True)),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                             alpha_pattern={"down_proj": 3.0})),
    "embedding_dora": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "lm_head"],
                                   use_dora=True)),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                    modules_to_save=["lm_head", "norm"])),
    "lora_bias_tokens": ("qwen2", dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], lora_bias=True,
                                       trainable_token_indices=[3, 7, 11])),
    "tied_all_linear": ("llama-tied", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "tied_tokens": ("llama-tied", dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[2, 5])),
}


@pytest.fixture(scope="module")
def bases(tiny) -> dict[str, Path]:
    return {"llama": tiny.model("llama"), "llama-tied": tiny.model("llama", tie=True, shards=2),
            "qwen2": tiny.model("qwen2")}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


def _peft_merged(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft_model(base, adapters).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft_merge_and_unload(case, bases, adapter_dir, tmp_path, run_cli):
    base_kind, config = CASES[case]
    base = bases[base_kind]
    adapter = make_peft_adapter(base, adapter_dir / case, seed=len(case), **config)
    out = tmp_path / "merged"
    run_cli("adapters", "merge", base, adapter, out)

    reference = _peft_merged(base, [adapter])
    ours, original = open_checkpoint(out), open_checkpoint(base)
    assert set(ours.names) == set(original.names)
    for name in ours.names:
        assert relative(ours.read(name), reference[name]) <= 1e-6, name
    changed = [name for name in ours.names if not torch.equal(ours.read(name), original.read(name))]
    assert len(changed) >= 2
    adapter_logits = logits(peft_model(base, [adapter]))
    assert torch.allclose(logits(load_model(out)), adapter_logits, atol=2e-5, rtol=1e-5)


def test_fan_in_fan_out_gpt2(tmp_path, run_cli):
    """GPT-2's Conv1D stores (in x out): the update is (B @ A)^T, DoRA's norm runs over the other dimension."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    base = tmp_path / "gpt2"
    model.save_pretrained(base)
    for name, extra in (("plain", {}), ("dora", {"use_dora": True})):
        adapter = make_peft_adapter(base, tmp_path / f"a-{name}", r=4, lora_alpha=8, fan_in_fan_out=True,
                                    target_modules=["c_attn", "c_proj", "c_fc"], **extra)
        out = tmp_path / f"m-{name}"
        run_cli("adapters", "merge", base, adapter, out)
        reference = _peft_merged(base, [adapter])
        ours = open_checkpoint(out)
        for tensor in ours.names:
            assert relative(ours.read(tensor), reference[tensor]) <= 1e-6, tensor
        assert torch.allclose(logits(load_model(out)), logits(peft_model(base, [adapter])), atol=2e-5)


def test_tied_embedding_lora_unties_and_keeps_the_adapter_logits(bases, adapter_dir, tmp_path, run_cli):
    """LoRA on the embedding of a tied base changes the input side only; the merged model must do the same."""
    base = bases["llama-tied"]
    adapter = make_peft_adapter(base, adapter_dir / "tied_embed", r=4, lora_alpha=8,
                                target_modules=["embed_tokens", "q_proj"])
    out = tmp_path / "merged"
    run_cli("adapters", "merge", base, adapter, out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ours = open_checkpoint(out)
    embedding = open_checkpoint(base).read("model.embed_tokens.weight")
    assert torch.equal(ours.read("lm_head.weight"), embedding)  # the head still sees the base matrix
    assert not torch.equal(ours.read("model.embed_tokens.weight"), embedding)
    assert torch.allclose(logits(load_model(out)), logits(peft_model(base, [adapter])), atol=2e-5)
    assert read_lineage(out).parameters["untied_embeddings"] is True


def test_several_adapters_with_weights(bases, adapter_dir, tmp_path, run_cli):
    base = bases["llama"]
    first = make_peft_adapter(base, adapter_dir / "w1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    second = make_peft_adapter(base, adapter_dir / "w2", seed=2, r=2, lora_alpha=4, use_rslora=True,
                               target_modules=["q_proj", "v_proj"])
    # weights 1, 1: PEFT's merge of both active adapters
    run_cli("adapters", "merge", base, first, second, tmp_path / "both")
    reference = _peft_merged(base, [first, second])
    ours = open_checkpoint(tmp_path / "both")
    for name in ours.names:
        assert relative(ours.read(name), reference[name]) <= 1e-6, name
    # weights 0.7, -0.3: W + 0.7 s1 B1 A1 - 0.3 s2 B2 A2, computed here in float64
    run_cli("adapters", "merge", base, first, second, tmp_path / "weighted", "--weights", "0.7,-0.3")
    weighted = open_checkpoint(tmp_path / "weighted")
    factors = [load_file(a / "adapter_model.safetensors") for a in (first, second)]
    name = "model.layers.1.self_attn.q_proj"
    expected = open_checkpoint(base).read(f"{name}.weight").double()
    for weight, tensors, scale in ((0.7, factors[0], 8 / 4), (-0.3, factors[1], 4 / 2**0.5)):
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        expected += weight * scale * b @ a
    assert relative(weighted.read(f"{name}.weight"), expected) <= 1e-6


def test_bfloat16_base_is_merged_in_float32_and_cast_once(tiny, tmp_path, run_cli):
    base = tiny.model("llama", dtype=torch.bfloat16)
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    run_cli("adapters", "merge", base, adapter, tmp_path / "m")
    merged = open_checkpoint(tmp_path / "m")
    name = "model.layers.0.self_attn.q_proj"
    tensors = load_file(adapter / "adapter_model.safetensors")
    delta = (2.0 * tensors[f"base_model.model.{name}.lora_B.weight"].float()
             @ tensors[f"base_model.model.{name}.lora_A.weight"].float())
    expected = (open_checkpoint(base).read(f"{name}.weight").float() + delta).to(torch.bfloat16)
    assert merged.info(f"{name}.weight").dtype_name == "BF16"
    assert torch.equal(merged.read(f"{name}.weight"), expected)
    assert torch.equal(merged.read("model.norm.weight"), open_checkpoint(base).read("model.norm.weight"))
    run_cli("adapters", "merge", base, adapter, tmp_path / "m32", "--dtype", "float32")
    assert open_checkpoint(tmp_path / "m32").info(f"{name}.weight").dtype_name == "F32"
    assert json.loads((tmp_path / "m32" / "config.json").read_text())["dtype"] == "float32"


def test_dequantized_base_equals_peft_on_a_bnb_4bit_base(tiny, tmp_path, run_cli):
    """--dequantized-base: the base's linear weights as bitsandbytes NF4 loading rounds them, plus the LoRA."""
    pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny.model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    run_cli("adapters", "merge", base, adapter, tmp_path / "m", "--dequantized-base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, device_map="cpu",
                                                         dtype=torch.float32)
    wrapped = peft_model(base, [adapter], model=quantized)
    ours = open_checkpoint(tmp_path / "m")
    plain = open_checkpoint(base)
    for module_name, module in wrapped.named_modules():
        if not hasattr(module, "lora_A") or "a0" not in module.lora_A:
            continue
        layer = module.get_base_layer()
        expected = dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state).float()
        expected = expected + module.get_delta_weight("a0").float()
        name = module_name.removeprefix("base_model.model.") + ".weight"
        assert relative(ours.read(name), expected) <= 1e-6, name
        assert relative(ours.read(name), plain.read(name)) > 1e-3  # the rounding is really there
    assert torch.equal(ours.read("model.embed_tokens.weight"), plain.read("model.embed_tokens.weight"))


def test_output_folder_and_lineage(bases, adapter_dir, tmp_path, run_cli):
    base = bases["llama-tied"]
    adapter = make_peft_adapter(base, adapter_dir / "lineage", r=2, lora_alpha=2, target_modules=["q_proj"])
    out = tmp_path / "m"
    run_cli("adapters", "merge", base, adapter, out, "--shard-size", "100KB")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files and "config.json" in files
    record = read_lineage(out)
    assert record.operation == "adapter-merge" and record.method == "lora"
    assert [p.role for p in record.parents] == ["base", "adapter"]
    assert record.parents[1].files["adapter_model.safetensors"] == sha256_of_file(adapter / "adapter_model.safetensors")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and record.outputs == {p.name: sha256_of_file(p) for p in shards}
    assert record.parameter_count == open_checkpoint(base).parameter_count()
    # existing output: refused without --force, replaced with it
    result = run_cli("adapters", "merge", base, adapter, out, expect=3)
    assert "already exists" in result.output
    run_cli("adapters", "merge", base, adapter, out, "--force")


def _rewrite_config(adapter: Path, folder: Path, **changes) -> Path:
    import shutil

    shutil.copytree(adapter, folder)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return folder


def test_bad_inputs_fail_cleanly(tiny, bases, adapter_dir, tmp_path, run_cli):
    base = bases["llama"]
    adapter = make_peft_adapter(base, adapter_dir / "bad", r=2, lora_alpha=2, target_modules=["q_proj"])
    other_base = tiny.model("llama", hidden_size=32, intermediate_size=64)
    out = tmp_path / "out"

    result = run_cli("adapters", "merge", other_base, adapter, out, expect=2)
    assert "model.layers.0.self_attn.q_proj.weight is [32, 32] in the base but [64, 64] in the adapter" in result.output

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert "adapter_config.json is missing" in run_cli("adapters", "merge", base, no_config, out, expect=2).output

    ia3 = _rewrite_config(adapter, tmp_path / "ia3", peft_type="IA3")
    assert "adapter type IA3 is not supported" in run_cli("adapters", "merge", base, ia3, out, expect=2).output
    loha = _rewrite_config(adapter, tmp_path / "loha", peft_type="LOHA")
    assert "LOHA is not supported" in run_cli("adapters", "inspect", loha, expect=2).output
    zero = _rewrite_config(adapter, tmp_path / "zero", r=0)
    assert "must be a positive integer" in run_cli("adapters", "merge", base, zero, out, expect=2).output

    assert "2 values for 1 adapters" in run_cli("adapters", "merge", base, adapter, out, "--weights", "1,2",
                                                 expect=2).output
    assert "this is a LoRA adapter, not a base model" in run_cli("adapters", "merge", adapter, adapter, out,
                                                                 expect=2).output
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert "Traceback" not in result.output
