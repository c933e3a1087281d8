"""The Triton kernels, run by Triton's interpreter on the CPU: the 4-bit QLoRA matmul (forward and backward
products with the LoRA term fused in) and SwiGLU, against float64 references, for odd shapes and
float32/bfloat16/float16; and the lean nodes running through them. Shapes are tiny: the interpreter is slow."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported (Triton reads it when decorating)

from mtool.train import kernels  # noqa: E402
from mtool.train.frozen_weight import LowRank, QuantizedWeight, dequantize  # noqa: E402

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the result is rounded once to its dtype: half an ulp relative, plus the float32 accumulation's error
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
             torch.float16: dict(rtol=1e-3, atol=1e-3)}


def quantized(weight: torch.Tensor, *, nested: bool, storage: torch.dtype = torch.uint8) -> QuantizedWeight:
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4",
                                  quant_storage=storage)
    return QuantizedWeight(packed, state)


def nf4_formula(weight: QuantizedWeight) -> torch.Tensor:
    """Dequantization written out from the stored bytes (float64): element 2i in the high nibble of byte i."""
    state = weight.state
    packed = weight.packed_bytes().to(torch.int64)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    count = state.shape[0] * state.shape[1]
    values = state.code.to(F64)[codes[:count]]
    if state.nested:
        blocks = state.state2.code.to(F64)[state.absmax.to(torch.int64)]
        blocks = blocks * state.state2.absmax.to(F64).repeat_interleave(256)[: blocks.numel()] + float(state.offset)
    else:
        blocks = state.absmax.to(F64)
    return (values * blocks.repeat_interleave(state.blocksize)[:count]).reshape(state.shape)


@pytest.mark.parametrize("nested", [True, False])
def test_bitsandbytes_layout_is_the_documented_formula(nested):
    weight = torch.randn(40, 70, generator=torch.Generator().manual_seed(0))
    stored = quantized(weight, nested=nested, storage=torch.float32)  # bytes kept in a float tensor (FSDP)
    assert stored.packed.dtype == torch.float32
    expected = nf4_formula(stored)
    torch.testing.assert_close(dequantize(stored, F64), expected.float().double(), rtol=1e-6, atol=1e-7)
    assert float((expected - weight.double()).abs().max()) < 0.4 * float(weight.abs().max())  # it is the weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_matmul_forward_and_backward_products(dtype, nested):
    from mtool.train.kernels.nf4_matmul import nf4_matmul

    generator = torch.Generator().manual_seed(1)
    d_out, d_in, tokens, rank = 37, 70, 19, 3  # none a multiple of the tiles or the 64-weight blocks
    weight = quantized(torch.randn(d_out, d_in, generator=generator) * 0.2, nested=nested)
    rounded = dequantize(weight, dtype).to(F64)  # bitsandbytes rounds the dequantized weight to the compute dtype
    x = torch.randn(tokens, d_in, generator=generator).to(dtype)
    u, v = torch.randn(tokens, rank, generator=generator), torch.randn(rank, d_out, generator=generator)
    forward = nf4_matmul(x, weight, transposed=False, low_rank=LowRank(u, v, 0.5))
    assert forward.dtype == dtype
    torch.testing.assert_close(forward.to(F64), x.to(F64) @ rounded.T + 0.5 * u.to(F64) @ v.to(F64),
                               **TOLERANCE[dtype])
    dy = torch.randn(tokens, d_out, generator=generator).to(dtype)
    u2, v2 = torch.randn(tokens, rank, generator=generator), torch.randn(rank, d_in, generator=generator)
    backward = nf4_matmul(dy, weight, transposed=True, low_rank=LowRank(u2, v2, 1.5))
    torch.testing.assert_close(backward.to(F64), dy.to(F64) @ rounded + 1.5 * u2.to(F64) @ v2.to(F64),
                               **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernels_forward_and_backward(dtype):
    from mtool.train.kernels.swiglu import swiglu_backward_inplace, swiglu_forward

    generator = torch.Generator().manual_seed(2)
    e, g, dh = (torch.randn(3, 301, generator=generator).to(dtype) for _ in range(3))
    leaf_e, leaf_g = e.to(F64).requires_grad_(), g.to(F64).requires_grad_()
    h_reference = torch.nn.functional.silu(leaf_e) * leaf_g
    h_reference.backward(dh.to(F64))
    torch.testing.assert_close(swiglu_forward(e, g).to(F64), h_reference.detach(), **TOLERANCE[dtype])
    h, de, dg = swiglu_backward_inplace(dh.clone(), e.clone(), g.clone())
    for got, want in ((h, h_reference.detach()), (de, leaf_e.grad), (dg, leaf_g.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.to(F64), want, **TOLERANCE[dtype])


def test_lean_qlora_layer_through_the_kernel_equals_the_formula():
    from mtool.train.lean_lora import LoraFactors, lean_lora_linear

    generator = torch.Generator().manual_seed(3)
    weight = quantized(torch.randn(21, 40, generator=generator) * 0.2, nested=True)
    dense = dequantize(weight, F64)
    a = torch.randn(3, 40, generator=generator, requires_grad=True)
    b = torch.randn(21, 3, generator=generator, requires_grad=True)
    x = torch.randn(2, 9, 40, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 9, 21, generator=generator)
    with kernels.use_kernels():
        assert kernels.kernels_active(x)
        y = lean_lora_linear(x, weight, None, LoraFactors(a, b, 2.0), training=True)
        (y * upstream).sum().backward()
    got = [y.detach(), x.grad, a.grad, b.grad]
    x64, a64, b64 = (t.detach().to(F64).requires_grad_() for t in (x, a, b))
    expected = x64 @ dense.T + 2.0 * (x64 @ a64.T) @ b64.T
    (expected * upstream.to(F64)).sum().backward()
    for value, want in zip(got, [expected.detach(), x64.grad, a64.grad, b64.grad]):
        torch.testing.assert_close(value.to(F64), want, rtol=1e-5, atol=1e-5)
    assert not kernels.enabled()


@pytest.mark.parametrize("block", ["mlp", "qkv"])
def test_fused_blocks_through_the_kernels_equal_the_float64_torch_path(block):
    from mtool.train.fused_blocks import Projection, qkv_function, swiglu_mlp_function

    generator = torch.Generator().manual_seed(4)
    hidden, width, rank, tokens = 24, 40, 2, 7
    if block == "mlp":
        shapes, function = [(width, hidden), (width, hidden), (hidden, width)], swiglu_mlp_function()
    else:
        shapes, function = [(hidden, hidden), (8, hidden), (8, hidden)], qkv_function()
    projections, tensors = [], []
    for d_out, d_in in shapes:
        projections.append(Projection(quantized(torch.randn(d_out, d_in, generator=generator) * 0.3, nested=True),
                                      None, 1.5))
        tensors += [torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator)]
    x = torch.randn(tokens, hidden, generator=generator)
    results = []
    for use, dtype in ((True, torch.float32), (False, F64)):  # the kernels in float32; torch's path in float64
        inputs = [t.detach().to(dtype).clone().requires_grad_() for t in [x] + tensors]
        with kernels.use_kernels(use):
            outputs = function.apply(*inputs, tuple(projections))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            upstream = torch.Generator().manual_seed(5)
            sum((out * torch.randn(out.shape, generator=upstream).to(dtype)).sum() for out in outputs).backward()
        results.append([out.detach() for out in outputs] + [t.grad for t in inputs])
    for got, want in zip(*results):
        torch.testing.assert_close(got.to(F64), want, rtol=1e-4, atol=1e-5)
