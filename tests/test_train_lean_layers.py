"""Memory-lean LoRA layers and fused blocks: the gradients of the plain formulas (float64), PEFT's results, and
only the input kept for the backward pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mtool.train.frozen_weight import QuantizedWeight, dequantize
from mtool.train.fused_blocks import fuse_blocks, swiglu_backward_
from mtool.train.lean_lora import LoraFactors, dropout_mask, lean_lora_linear, make_lora_layers_lean
from mtool.train.measure import count_saved_tensors

F64 = torch.float64


def quantized(weight: torch.Tensor, *, nested: bool = True) -> QuantizedWeight:
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight.float(), blocksize=64, compress_statistics=nested, quant_type="nf4")
    return QuantizedWeight(packed, state)


def reference_output(x, weight, bias, a, b, scale, magnitude, mask, keep):
    """The LoRA / DoRA formulas of mtool.train.lean_lora's docstring, written out in float64."""
    dropped = x if mask is None else x * mask / keep
    base = x @ weight.T + (0 if bias is None else bias)
    lora = scale * (dropped @ a.T) @ b.T
    if magnitude is None:
        return base + lora
    norm = torch.linalg.norm(weight + scale * b @ a, dim=1).detach()
    g = magnitude / norm
    return base + (g - 1) * (dropped @ weight.T) + g * lora


@pytest.mark.parametrize("base", ["lora", "qlora"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_layer_gradients_equal_the_float64_formula(base, variant, dropout):
    generator = torch.Generator().manual_seed(3)
    d_in, d_out, rank = 37, 29, 4  # odd shapes: 4-bit blocks straddle rows
    dense = torch.randn(d_out, d_in, generator=generator, dtype=F64) * 0.3
    weight = quantized(dense) if base == "qlora" else dense
    reference_weight = dequantize(weight, F64) if base == "qlora" else dense
    bias = torch.randn(d_out, generator=generator, dtype=F64) if base == "lora" else None
    a = torch.randn(rank, d_in, generator=generator, dtype=F64, requires_grad=True)
    b = torch.randn(d_out, rank, generator=generator, dtype=F64, requires_grad=True)
    scale = 8 / (math.sqrt(rank) if variant == "rslora" else rank)
    magnitude = (torch.linalg.norm(reference_weight, dim=1) * 1.2).requires_grad_() if variant == "dora" else None
    x = torch.randn(3, 5, d_in, generator=generator, dtype=F64, requires_grad=True)
    upstream = torch.randn(3, 5, d_out, generator=generator, dtype=F64)

    torch.manual_seed(11)
    y = lean_lora_linear(x, weight, bias, LoraFactors(a, b, scale, magnitude, dropout), training=True)
    (y * upstream).sum().backward()
    trainable = [t for t in (x, a, b, magnitude) if t is not None]
    lean = [y.detach()] + [t.grad.clone() for t in trainable]
    for tensor in trainable:
        tensor.grad = None
    torch.manual_seed(11)
    mask = dropout_mask(x.detach().reshape(-1, d_in), dropout)
    mask = None if mask is None else mask.reshape(x.shape)
    expected = reference_output(x, reference_weight, bias, a, b, scale, magnitude, mask, 1 - dropout)
    (expected * upstream).sum().backward()
    for got, want in zip(lean, [expected.detach()] + [t.grad for t in trainable]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class TwoLayers(torch.nn.Module):
    def __init__(self, first: torch.nn.Module, second: torch.nn.Module) -> None:
        super().__init__()
        self.q_proj, self.o_proj = first, second

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def _linear4bit(d_in, d_out, dtype, generator):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=dtype, quant_type="nf4")
    weight = torch.randn(d_out, d_in, generator=generator) * 0.1
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer).to("cpu")
    return layer


def _peft_pair(module, **lora):
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(module, LoraConfig(target_modules=["q_proj", "o_proj"], init_lora_weights=False,
                                                  **lora))
    lean = copy.deepcopy(reference)
    assert make_lora_layers_lean(lean) == 2
    return reference, lean


def _run(model, x, upstream):
    x = x.clone().requires_grad_()
    y = model(x)
    (y.float() * upstream).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_switched_peft_layers_compute_what_peft_computes(dora, rslora):
    generator = torch.Generator().manual_seed(0)
    module = TwoLayers(torch.nn.Linear(48, 40), torch.nn.Linear(40, 48, bias=False)).double()
    reference, lean = _peft_pair(module, r=4, lora_alpha=8, use_dora=dora, use_rslora=rslora)
    x = torch.randn(2, 7, 48, generator=generator, dtype=F64)
    upstream = torch.randn(2, 7, 48, generator=generator, dtype=F64)
    for got, want in zip(_run(lean, x, upstream), _run(reference, x, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_switched_qlora_layers_compute_what_peft_computes(dtype, dora):
    generator = torch.Generator().manual_seed(1)
    module = TwoLayers(_linear4bit(128, 64, dtype, generator), _linear4bit(64, 128, dtype, generator))
    reference, lean = _peft_pair(module, r=8, lora_alpha=16, use_dora=dora)
    x = torch.randn(2, 5, 128, generator=generator).to(dtype)
    upstream = torch.randn(2, 5, 128, generator=generator)
    # bf16: PEFT rounds the LoRA path's input gradient to bf16 before adding it to the base's; the lean node adds
    # them in float32 and rounds once, so they differ by bf16 rounding (relative to the tensor's size)
    for got, want in zip(_run(lean, x, upstream), _run(reference, x, upstream)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_lean_layer_keeps_only_its_input_and_the_rank_r_product():
    from peft import LoraConfig, get_peft_model

    tokens, d_in, rank = 6 * 8, 64, 4
    module = TwoLayers(torch.nn.Linear(d_in, 32, bias=False), torch.nn.Linear(32, d_in, bias=False)).bfloat16()
    config = LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    reference = get_peft_model(module, config)  # PEFT keeps LoRA matrices in float32
    lean = copy.deepcopy(reference)
    make_lora_layers_lean(lean)
    x = torch.randn(6, 8, d_in).bfloat16().requires_grad_()
    kept = {}
    for name, model in (("peft", reference), ("lean", lean)):
        layer = model.base_model.model.q_proj
        with count_saved_tensors(model) as saved:
            layer(x)
        kept[name] = saved.bytes
    assert kept["lean"] == tokens * d_in * 2 + tokens * rank * 4  # x in bf16 + x A^T in float32
    assert kept["peft"] >= tokens * d_in * 4  # PEFT keeps a float32 copy of x for lora_A


def test_swiglu_backward_is_the_derivative_of_silu_times_up():
    generator = torch.Generator().manual_seed(2)
    e, g, dh = (torch.randn(7, 13, generator=generator, dtype=F64) for _ in range(3))
    leaf_e, leaf_g = e.clone().requires_grad_(), g.clone().requires_grad_()
    h_reference = torch.nn.functional.silu(leaf_e) * leaf_g
    h_reference.backward(dh)
    h, de, dg = swiglu_backward_(dh.clone(), e.clone(), g.clone())
    for got, want in ((h, h_reference.detach()), (de, leaf_e.grad), (dg, leaf_g.grad)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    h16, de16, dg16 = swiglu_backward_(dh.bfloat16(), e.bfloat16(), g.bfloat16())
    assert h16.dtype == torch.bfloat16
    torch.testing.assert_close(de16.double(), leaf_e.grad, rtol=2e-2, atol=2e-2)


def _tiny_decoder(architecture: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        architecture]
    torch.manual_seed(0)
    config = config_class(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=97)
    return model_class(config).to(dtype)


@pytest.mark.parametrize("architecture,targets", [
    ("llama", "all-linear"),
    ("qwen2", ["q_proj", "v_proj", "down_proj"]),  # q/k/v biases; some projections frozen
])
def test_fused_mlp_and_qkv_give_peft_gradients(architecture, targets):
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(_tiny_decoder(architecture, F64), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    lean = copy.deepcopy(reference)
    make_lora_layers_lean(lean)
    assert fuse_blocks(lean) == (2, 2)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (reference, lean):
        model.train()
        with count_saved_tensors(model) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, saved.bytes))
    (loss_ref, grads_ref, kept_ref), (loss_lean, grads_lean, kept_lean) = results
    torch.testing.assert_close(loss_lean, loss_ref, rtol=1e-12, atol=1e-12)
    assert grads_lean.keys() == grads_ref.keys()
    for name, gradient in grads_ref.items():
        torch.testing.assert_close(grads_lean[name], gradient, rtol=1e-10, atol=1e-12)
    assert kept_lean < kept_ref


def test_fused_blocks_on_a_4bit_base_match_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    from mtool.tinymodels import TinySpec, build_model

    spec = TinySpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    vocab_size=128)
    base = build_model(spec, seed=0)
    base.config.quantization_config = None
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
    torch.manual_seed(0)
    reference = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    lean = copy.deepcopy(reference)
    make_lora_layers_lean(lean)
    assert fuse_blocks(lean) == (2, 2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (reference, lean):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, gradient in grads[0].items():
        torch.testing.assert_close(grads[1][name], gradient, rtol=1e-4, atol=1e-6)
