"""``adapters merge --dequantized-base`` on a bfloat16 base: ``dequant(W) + s B A`` in float32, rounded once."""

from __future__ import annotations

import copy

import pytest
import torch

from mtool.io.reading import open_checkpoint
from tests.support.peft_adapters import make_peft_adapter, peft_model


def test_bf16_base_rounds_once(tiny, tmp_path, run_cli) -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    base = tiny.model("llama", dtype=torch.bfloat16)
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    run_cli("-q", "adapters", "merge", base, adapter, tmp_path / "m", "--dequantized-base")
    merged, plain = open_checkpoint(tmp_path / "m"), open_checkpoint(base)
    wrapped = peft_model(base, [adapter])
    checked, twice_rounded_differs = 0, 0
    for module_name, module in wrapped.named_modules():
        if not hasattr(module, "lora_A") or "a0" not in module.lora_A:
            continue
        name = module_name.removeprefix("base_model.model.") + ".weight"
        weight = plain.read(name)  # bfloat16, as bitsandbytes quantizes it when it loads the base
        packed, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        exact = copy.copy(state)
        exact.dtype = torch.float32
        dequantized = bnb.dequantize_4bit(packed, exact, blocksize=64, quant_type="nf4")  # code x scale, float32
        update = module.get_delta_weight("a0").float()
        expected = (dequantized + update).bfloat16()  # one rounding
        assert merged.read(name).dtype == torch.bfloat16
        assert torch.equal(merged.read(name), expected), name
        twice = (dequantized.bfloat16().float() + update).bfloat16()  # the dequantized weight rounded first
        twice_rounded_differs += int((twice != expected).sum())
        checked += expected.numel()
    assert checked > 0 and twice_rounded_differs > 0.01 * checked  # the test tells the two roundings apart
    assert torch.equal(merged.read("model.embed_tokens.weight"), plain.read("model.embed_tokens.weight"))
