"""Memory-lean LoRA layers: one autograd node per adapted linear layer that keeps only what its backward needs.

A LoRA layer computes, for an input ``x`` (``T x d_in``, compute dtype), the frozen weight ``W`` (dense or
4-bit), ``A`` (``r x d_in``), ``B`` (``d_out x r``), the scale ``s`` (``alpha / r``; rsLoRA ``alpha / sqrt(r)``)
and an optional dropout mask ``M`` with keep probability ``k`` (``x_d = x * M / k``, else ``x_d = x``):

    LoRA    y = x W^T + b + s (x_d A^T) B^T
    DoRA    y = x W^T + b + (g - 1) x_d W^T + g s (x_d A^T) B^T,   g = m / ||W + s B A||_row  (treated as a
            constant, as PEFT and the DoRA paper do; without dropout this is g (x W^T + s x A^T B^T) + b)

and its backward, with ``u = x_d A^T`` (``T x r``) and ``h = dy B`` (``T x r``; DoRA: ``h = (g dy) B``):

    dx = dy W + s (h A) * M / k                                   (DoRA: dy W + [((g - 1) dy) W + s h A] * M / k)
    dB = s dy^T u   (DoRA: s (g dy)^T u)      dA = s h^T x_d      dm = sum_T dy * (x_d W^T + s u B^T) / ||.||

PEFT's layers reach the same numbers through autograd, which keeps a float32 copy of ``x`` per module in
bf16/fp16 runs (the LoRA matrices are float32) and the products around them. This node keeps ``x`` as it came
(one tensor, shared by the q/k/v or gate/up projections that read the same input), ``u`` (``r`` floats per
token), the dropout mask when there is one (a byte per element) and, for DoRA, ``x_d W^T`` in the compute dtype.
The dequantized 4-bit weight is never kept: both products dequantize it again (:mod:`mtool.train.frozen_weight`).
The LoRA path runs in float32 like PEFT's (``x`` is cast for the product and the cast dropped at once), so the
results are PEFT's up to rounding order.

:func:`make_lora_layers_lean` switches every PEFT LoRA ``Linear`` / bitsandbytes ``Linear4bit`` layer of a
model to this node (by class, so PEFT still saves, loads and merges them); layers or calls it does not cover
(merged or disabled adapters, several active adapters, mixed-adapter batches, LoRA biases) run PEFT's forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtool.train.frozen_weight import LowRank, QuantizedWeight, dequantize, frozen_weight_of, linear, linear_transposed

if TYPE_CHECKING:
    import torch

ADAPTER = "default"


@dataclass(frozen=True)
class LoraFactors:
    """The trainable side of one adapted layer."""

    a: "torch.Tensor"  # r x d_in
    b: "torch.Tensor"  # d_out x r
    scale: float
    magnitude: "torch.Tensor | None" = None  # DoRA's m (d_out), else None
    dropout: float = 0.0


def dora_norm(weight: "torch.Tensor | QuantizedWeight", factors: LoraFactors) -> "torch.Tensor":
    """``||W + s B A||_row`` in float32 (float64 for float64 factors), detached: DoRA's norm takes no gradient."""
    import torch

    with torch.no_grad():
        dtype = torch.float64 if factors.a.dtype == torch.float64 else torch.float32
        combined = torch.add(dequantize(weight, dtype), factors.b.to(dtype) @ factors.a.to(dtype), alpha=factors.scale)
        return torch.linalg.norm(combined, dim=1)


def project(x: "torch.Tensor", weight: "torch.Tensor | QuantizedWeight", bias: "torch.Tensor | None",
            a: "torch.Tensor | None", b: "torch.Tensor | None",
            scale: float) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """``(y, u)``: ``y = x W^T + bias + s u B^T`` with ``u = x A^T`` (float32), or ``(x W^T + bias, None)`` for
    a layer without LoRA. ``x`` is 2-D."""
    if a is None:
        return linear(x, weight, bias), None
    u = x.to(a.dtype) @ a.t()
    return linear(x, weight, bias, LowRank(u, b.t(), scale)), u


def project_backward(dy: "torch.Tensor", x: "torch.Tensor", u: "torch.Tensor | None",
                     weight: "torch.Tensor | QuantizedWeight", a: "torch.Tensor | None", b: "torch.Tensor | None",
                     scale: float, *, need_input: bool = True) -> tuple["torch.Tensor | None", ...]:
    """``(dx, dA, dB)`` of :func:`project`: ``dx = dy W + s (dy B) A``, ``dA = s (dy B)^T x``,
    ``dB = s dy^T u`` (``dx`` None unless ``need_input``; ``dA``/``dB`` None for a layer without LoRA)."""
    if a is None:
        return (linear_transposed(dy, weight) if need_input else None), None, None
    dy_lora = dy.to(a.dtype)
    h = dy_lora @ b
    dx = linear_transposed(dy, weight, LowRank(h, a, scale)) if need_input else None
    return dx, (h.t() @ x.to(a.dtype)).mul_(scale), (dy_lora.t() @ u).mul_(scale)


def _lean_lora_function():
    import torch

    class LeanLoraLinear(torch.autograd.Function):
        """See the module docstring; ``x`` is 2-D here (tokens x features)."""

        @staticmethod
        def forward(ctx, x, a, b, magnitude, weight, bias, scale, mask, keep):
            ctx.weight, ctx.scale, ctx.keep = weight, scale, keep
            ctx.has_bias = bias is not None
            ctx.magnitude_dtype = None if magnitude is None else magnitude.dtype
            if magnitude is None and mask is None:
                y, u = project(x, weight, bias, a, b, scale)
                ctx.save_for_backward(x, u, mask, a, b)
                return y
            dropped = x if mask is None else x * mask / keep
            u = dropped.to(a.dtype) @ a.t()
            if magnitude is None:
                y = linear(x, weight, bias)
                y = (y.to(u.dtype) + scale * (u @ b.t())).to(x.dtype)
                ctx.save_for_backward(x, u, mask, a, b)
                return y
            norm = dora_norm(weight, LoraFactors(a, b, scale, magnitude))
            g = magnitude.detach().to(norm.dtype) / norm
            base = linear(x, weight)
            based = base if mask is None else linear(dropped, weight)
            y = base.to(g.dtype) + (g - 1) * based + g * scale * (u @ b.t())
            if bias is not None:
                y = y + bias.to(g.dtype)
            ctx.save_for_backward(x, u, mask, a, b, based, g, norm)
            return y.to(x.dtype)

        @staticmethod
        def backward(ctx, dy):
            x, u, mask, a, b, *dora = ctx.saved_tensors
            weight, scale, keep = ctx.weight, ctx.scale, ctx.keep
            needs = ctx.needs_input_grad
            dm = None
            dbias = dy.sum(0) if ctx.has_bias and needs[5] else None
            if not dora and mask is None:
                dx, da, db = project_backward(dy, x, u, weight, a, b, scale, need_input=needs[0])
                return dx, da, db, None, None, dbias, None, None, None
            lora_dtype = a.dtype
            dropped = x if mask is None else x * mask / keep
            if not dora:
                dy_lora = dy.to(lora_dtype)
                h = dy_lora @ b
                dx = None
                if needs[0]:
                    dx = linear_transposed(dy, weight)
                    dx += (scale * (h @ a) * mask / keep).to(dx.dtype)
                db = (dy_lora.t() @ u).mul_(scale)
            else:
                based, g, norm = dora
                gdy = dy.to(g.dtype) * g
                h = gdy.to(lora_dtype) @ b
                dx = None
                if needs[0]:
                    if mask is None:
                        dx = linear_transposed(gdy.to(dy.dtype), weight, LowRank(h, a, scale))
                    else:
                        inner = linear_transposed(((g - 1) * dy.to(g.dtype)).to(dy.dtype), weight)
                        inner = inner.to(lora_dtype) + scale * (h @ a)
                        dx = linear_transposed(dy, weight) + (inner * mask / keep).to(dy.dtype)
                db = (gdy.to(lora_dtype).t() @ u).mul_(scale)
                if needs[3]:
                    z = based.to(g.dtype) + scale * (u @ b.t()).to(g.dtype)
                    dm = ((dy.to(g.dtype) * z).sum(0) / norm).to(ctx.magnitude_dtype)
            da = (h.t() @ dropped.to(lora_dtype)).mul_(scale)
            return dx, da, db, dm, None, dbias, None, None, None

    return LeanLoraLinear


@functools.cache
def lean_lora_function() -> Any:
    """The autograd function (built on first use: torch is imported lazily)."""
    return _lean_lora_function()


def dropout_mask(x: "torch.Tensor", probability: float) -> "torch.Tensor | None":
    """A keep mask (bool, ``x``'s shape) drawn with keep probability ``1 - probability``; None without dropout."""
    import torch

    if probability <= 0:
        return None
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - probability)


def lean_lora_linear(x: "torch.Tensor", weight: "torch.Tensor | QuantizedWeight", bias: "torch.Tensor | None",
                     factors: LoraFactors, *, training: bool) -> "torch.Tensor":
    """The adapted layer's output for ``x`` (``[..., d_in]``); see the module docstring."""
    flat = x.reshape(-1, x.shape[-1])
    probability = factors.dropout if training else 0.0
    mask = dropout_mask(flat, probability)
    y = lean_lora_function().apply(flat, factors.a, factors.b, factors.magnitude, weight, bias, factors.scale, mask,
                                   1.0 - probability)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------------
# PEFT layers


def factors_of(layer: Any) -> LoraFactors | None:
    """The LoRA factors of a PEFT LoRA layer's single active adapter, or None when this node does not cover it."""
    import torch

    if layer.disable_adapters or layer.merged or list(layer.active_adapters) != [ADAPTER]:
        return None
    if ADAPTER not in layer.lora_A or getattr(layer, "lora_bias", {}).get(ADAPTER, False):
        return None
    lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    if not isinstance(lora_a, torch.nn.Linear) or lora_a.bias is not None or lora_b.bias is not None:
        return None
    if getattr(layer, "fan_in_fan_out", False):
        return None
    dropout = layer.lora_dropout[ADAPTER]
    magnitude = None
    if ADAPTER in getattr(layer, "lora_magnitude_vector", {}):
        magnitude = layer.lora_magnitude_vector[ADAPTER].weight
    elif ADAPTER in getattr(layer, "lora_variant", {}):
        return None  # another PEFT variant (aLoRA, ...)
    return LoraFactors(lora_a.weight, lora_b.weight, float(layer.scaling[ADAPTER]), magnitude,
                       float(getattr(dropout, "p", 0.0)))


def _covered_call(layer: Any, args: tuple, kwargs: dict) -> LoraFactors | None:
    """The factors when this call can take the lean node (no extra arguments, a covered adapter, a weight in
    bitsandbytes' training layout), else None."""
    if args or kwargs:
        return None
    state = getattr(layer.get_base_layer().weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):  # repacked for CPU inference by bitsandbytes
        return None
    return factors_of(layer)


@functools.cache
def lean_class(peft_class: type) -> type:
    """``peft_class`` with the lean forward (one subclass per PEFT layer class)."""

    def forward(self: Any, x: "torch.Tensor", *args: Any, **kwargs: Any) -> "torch.Tensor":
        factors = _covered_call(self, args, kwargs)
        if factors is None:
            return peft_class.forward(self, x, *args, **kwargs)
        base = self.get_base_layer()
        return lean_lora_linear(x, frozen_weight_of(base), base.bias, factors, training=self.training)

    return type(f"Lean{peft_class.__name__}", (peft_class,), {"forward": forward, "__module__": __name__})


def lean_layer_classes() -> tuple[type, ...]:
    """The PEFT layer classes this module covers: LoRA on ``nn.Linear`` and on bitsandbytes ``Linear4bit``."""
    from peft.tuners.lora import layer

    classes: list[type] = [layer.Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        classes.append(Linear4bit)
    except ImportError:  # bitsandbytes missing
        pass
    return tuple(classes)


def make_lora_layers_lean(model: Any) -> int:
    """Switch every covered PEFT LoRA layer of ``model`` to the lean node; returns how many were switched."""
    covered = lean_layer_classes()
    switched = 0
    for module in model.modules():
        if type(module) in covered:
            module.__class__ = lean_class(type(module))
            switched += 1
    return switched
