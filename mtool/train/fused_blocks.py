"""Fused blocks of a Llama-family decoder layer: the SwiGLU MLP and the q/k/v projections, each one autograd
node with a hand-written backward.

Every projection ``P`` below is the layer's frozen weight plus (when adapted) its LoRA, computed by
:func:`mtool.train.lean_lora.project`: ``P(x) = x W^T + b + s (x A^T) B^T``, ``u_P = x A^T``.

SwiGLU MLP (Llama, Mistral, Qwen2/3: ``hidden_act`` silu)::

    e = G(x)    g = U(x)    h = silu(e) * g = e sigmoid(e) g    y = D(h)
    backward:   dh = dy W_D + s_D (dy B_D) A_D
                de = dh * g * sigmoid(e) * (1 + e (1 - sigmoid(e)))    dg = dh * silu(e)    (in place)
                dx = de W_G + s_G (de B_G) A_G + dg W_U + s_U (dg B_U) A_U
                dA_P = s_P (dP B_P)^T in_P      dB_P = s_P dP^T u_P

Kept for the backward: ``x``, ``e``, ``g`` (compute dtype) and the rank-``r`` ``u``'s; ``h`` is recomputed from
``e`` and ``g``, and ``h``, ``de``, ``dg`` are written over ``g``, ``e`` and ``dh`` (the node's backward runs
once). Autograd through the module keeps ``x``, ``e``, ``silu(e)``, ``g`` and ``h``, plus the float32 copies
PEFT makes of ``x`` and ``h`` in bf16/fp16 runs.

q/k/v projections (one input, three outputs)::

    q, k, v = Q(x), K(x), V(x)      dx = sum_P dP W_P + s_P (dP B_P) A_P

Kept: ``x`` once and the ``u``'s. The attention code of the model is left as it is: the three projection
modules share a :class:`QKVGroup`; the first call computes all three outputs for its input in one node, the
other two take theirs (the same input tensor) from the group.

On CUDA with the kernels on, the 4-bit products run in :mod:`mtool.train.kernels.nf4_matmul` and the SwiGLU
in :mod:`mtool.train.kernels.swiglu`. A block is fused only when every projection is frozen or carries plain
LoRA without dropout, DoRA or bias; others keep the per-layer lean node.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtool.train.frozen_weight import LowRank, QuantizedWeight, frozen_weight_of, linear_transposed
from mtool.train.lean_lora import factors_of, lean_layer_classes, project, project_backward

if TYPE_CHECKING:
    import torch

SWIGLU_ACTIVATIONS = ("silu", "swish")


@dataclass(frozen=True)
class Projection:
    """A frozen linear layer and, when adapted, its LoRA scale (the LoRA tensors travel as autograd inputs)."""

    weight: "torch.Tensor | QuantizedWeight"
    bias: "torch.Tensor | None"
    scale: float | None  # None: no LoRA


def projection_parts(module: Any) -> tuple[Projection, "torch.Tensor | None", "torch.Tensor | None"] | None:
    """``(projection, A, B)`` of a PEFT LoRA layer or a frozen linear layer; None when it cannot be fused."""
    import torch

    if isinstance(module, lean_layer_classes()):
        factors = factors_of(module)
        if factors is None or factors.magnitude is not None or factors.dropout > 0:
            return None
        base = module.get_base_layer()
        return Projection(frozen_weight_of(base), base.bias, factors.scale), factors.a, factors.b
    if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and \
            (module.bias is None or not module.bias.requires_grad):
        return Projection(frozen_weight_of(module), module.bias, None), None, None
    return None


# ---------------------------------------------------------------------------------------------------
# SwiGLU


def swiglu(e: "torch.Tensor", g: "torch.Tensor") -> "torch.Tensor":
    """``silu(e) * g``, computed in float32 (float64 for float64) and rounded once to ``e.dtype``."""
    import torch

    from mtool.train.kernels import kernels_active

    if kernels_active(e):
        from mtool.train.kernels.swiglu import swiglu_forward

        return swiglu_forward(e, g)
    wide = torch.promote_types(e.dtype, torch.float32)
    return torch.nn.functional.silu(e.to(wide)).mul_(g.to(wide)).to(e.dtype)


def swiglu_backward_(dh: "torch.Tensor", e: "torch.Tensor",
                     g: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """``(h, de, dg)`` for the upstream gradient ``dh`` (see the module docstring), written over the inputs the
    caller no longer needs: ``h`` into ``g``, ``de`` into ``e`` and ``dg`` into ``dh``. Uses the identity
    ``sigmoid(e) (1 + e (1 - sigmoid(e))) = sigmoid(e) + silu(e) - silu(e) sigmoid(e)``; two temporaries."""
    import torch

    from mtool.train.kernels import kernels_active

    if kernels_active(e):
        from mtool.train.kernels.swiglu import swiglu_backward_inplace

        return swiglu_backward_inplace(dh, e, g)
    wide = torch.promote_types(e.dtype, torch.float32)
    if e.dtype != wide:  # compute in float32 copies, then round into the buffers
        h, de, dg = swiglu_backward_(dh.to(wide), e.to(wide), g.to(wide))
        return g.copy_(h), e.copy_(de), dh.copy_(dg)
    sig = torch.sigmoid(e)
    silu = e * sig
    e.copy_(silu).mul_(sig).neg_().add_(silu).add_(sig).mul_(g).mul_(dh)  # de
    del sig
    g.mul_(silu)  # h
    dh.mul_(silu)  # dg
    return g, e, dh


def _swiglu_mlp_function():
    import torch

    class FusedSwiGLUMLP(torch.autograd.Function):
        """Inputs: x (2-D), then A, B of gate, up and down (None without LoRA); the three projections."""

        @staticmethod
        def forward(ctx, x, gate_a, gate_b, up_a, up_b, down_a, down_b, projections):
            gate, up, down = projections
            e, u_gate = project(x, gate.weight, gate.bias, gate_a, gate_b, gate.scale)
            g, u_up = project(x, up.weight, up.bias, up_a, up_b, up.scale)
            h = swiglu(e, g)
            y, u_down = project(h, down.weight, down.bias, down_a, down_b, down.scale)
            ctx.projections = projections
            ctx.save_for_backward(x, e, g, u_gate, u_up, u_down, gate_a, gate_b, up_a, up_b, down_a, down_b)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, e, g, u_gate, u_up, u_down, gate_a, gate_b, up_a, up_b, down_a, down_b = ctx.saved_tensors
            gate, up, down = ctx.projections
            if down_a is None:
                dh = linear_transposed(dy, down.weight)
            else:
                dy_lora = dy.to(down_a.dtype)
                h_down = dy_lora @ down_b
                dh = linear_transposed(dy, down.weight, LowRank(h_down, down_a, down.scale))
            h, de, dg = swiglu_backward_(dh, e, g)
            down_da = down_db = None
            if down_a is not None:
                down_da = (h_down.t() @ h.to(down_a.dtype)).mul_(down.scale)
                down_db = (dy_lora.t() @ u_down).mul_(down.scale)
            dx, gate_da, gate_db = project_backward(de, x, u_gate, gate.weight, gate_a, gate_b, gate.scale)
            dx_up, up_da, up_db = project_backward(dg, x, u_up, up.weight, up_a, up_b, up.scale)
            dx += dx_up
            return dx, gate_da, gate_db, up_da, up_db, down_da, down_db, None

    return FusedSwiGLUMLP


def _qkv_function():
    import torch

    class FusedQKV(torch.autograd.Function):
        """Inputs: x (2-D), then A, B of q, k and v (None without LoRA); the three projections."""

        @staticmethod
        def forward(ctx, x, q_a, q_b, k_a, k_b, v_a, v_b, projections):
            factors = ((q_a, q_b), (k_a, k_b), (v_a, v_b))
            outputs, us = [], []
            for projection, (a, b) in zip(projections, factors):
                out, u = project(x, projection.weight, projection.bias, a, b, projection.scale)
                outputs.append(out)
                us.append(u)
            ctx.projections = projections
            ctx.save_for_backward(x, *us, q_a, q_b, k_a, k_b, v_a, v_b)
            return tuple(outputs)

        @staticmethod
        def backward(ctx, dq, dk, dv):
            x, u_q, u_k, u_v, q_a, q_b, k_a, k_b, v_a, v_b = ctx.saved_tensors
            dx = None
            grads: list[Any] = []
            for projection, d, u, a, b in zip(ctx.projections, (dq, dk, dv), (u_q, u_k, u_v), (q_a, k_a, v_a),
                                              (q_b, k_b, v_b)):
                part, da, db = project_backward(d, x, u, projection.weight, a, b, projection.scale)
                dx = part if dx is None else dx.add_(part)
                grads += [da, db]
            return (dx, *grads, None)

    return FusedQKV


@functools.cache
def swiglu_mlp_function() -> Any:
    return _swiglu_mlp_function()


@functools.cache
def qkv_function() -> Any:
    return _qkv_function()


def _flat(x: "torch.Tensor") -> "torch.Tensor":
    return x.reshape(-1, x.shape[-1])


def fused_swiglu_mlp(mlp: Any, x: "torch.Tensor") -> "torch.Tensor | None":
    """The MLP's output through the fused node, or None when one of its projections cannot be fused."""
    parts = [projection_parts(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(part is None for part in parts):
        return None
    projections = tuple(part[0] for part in parts)
    tensors = [tensor for part in parts for tensor in part[1:]]
    y = swiglu_mlp_function().apply(_flat(x), *tensors, projections)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class QKVGroup:
    """The q/k/v projections of one attention module: the first of them called with an input computes all three
    outputs in one node; the other two collect theirs for the same input tensor."""

    names = ("q_proj", "k_proj", "v_proj")

    def __init__(self, attention: Any) -> None:
        import weakref

        self._attention = weakref.ref(attention)
        self._pending: dict[str, Any] = {}
        self._input: Any = None  # weak reference to the input the pending outputs belong to
        self._version = -1

    def output(self, name: str, x: "torch.Tensor", fallback: Any) -> "torch.Tensor":
        if self._input is not None and self._input() is x and self._version == x._version and name in self._pending:
            out = self._pending.pop(name)
            if not self._pending:
                self._input = None
            return out
        attention = self._attention()
        parts = [projection_parts(getattr(attention, n)) for n in self.names] if attention is not None else [None]
        if any(part is None for part in parts):
            return fallback(x)
        projections = tuple(part[0] for part in parts)
        tensors = [tensor for part in parts for tensor in part[1:]]
        outputs = qkv_function().apply(_flat(x), *tensors, projections)
        shaped = {n: out.reshape(*x.shape[:-1], out.shape[-1]) for n, out in zip(self.names, outputs)}
        mine = shaped.pop(name)
        import weakref

        self._pending, self._input, self._version = shaped, weakref.ref(x), x._version
        return mine


# ---------------------------------------------------------------------------------------------------
# Switching a model's blocks


@functools.cache
def fused_mlp_class(mlp_class: type) -> type:
    def forward(self: Any, x: "torch.Tensor") -> "torch.Tensor":
        y = fused_swiglu_mlp(self, x) if self.training and torch_grad_enabled() else None
        return mlp_class.forward(self, x) if y is None else y

    return type(f"Fused{mlp_class.__name__}", (mlp_class,), {"forward": forward, "__module__": __name__})


@functools.cache
def grouped_projection_class(projection_class: type) -> type:
    def forward(self: Any, x: "torch.Tensor", *args: Any, **kwargs: Any) -> "torch.Tensor":
        group = getattr(self, "_mtool_qkv_group", None)
        if group is None or args or kwargs or not self.training or not torch_grad_enabled():
            return projection_class.forward(self, x, *args, **kwargs)
        return group.output(self._mtool_qkv_name, x, lambda value: projection_class.forward(self, value))

    return type(f"Grouped{projection_class.__name__}", (projection_class,),
                {"forward": forward, "__module__": __name__})


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def _is_swiglu_mlp(module: Any, activation: str | None) -> bool:
    import torch

    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' own SiLU module
    return activation in SWIGLU_ACTIVATIONS and silu and all(hasattr(module, n) for n in ("gate_proj", "up_proj",
                                                                                        "down_proj"))


def fuse_blocks(model: Any) -> tuple[int, int]:
    """Switch the SwiGLU MLPs and q/k/v projections of a Llama-family model to the fused nodes; returns
    ``(MLPs, attention modules)`` switched. Blocks with a projection that cannot be fused (DoRA, dropout, a LoRA
    bias) are left alone; a switched block checks again at every call (adapters disabled, several adapters)."""
    config = getattr(model, "config", None)
    activation = getattr(getattr(config, "get_text_config", lambda: config)(), "hidden_act", None)
    mlps = attentions = 0

    def fusable(module: Any, names: tuple[str, ...]) -> bool:
        return all(projection_parts(getattr(module, name)) is not None for name in names)

    for module in model.modules():
        if _is_swiglu_mlp(module, activation) and not type(module).__name__.startswith("Fused") and \
                fusable(module, ("gate_proj", "up_proj", "down_proj")):
            module.__class__ = fused_mlp_class(type(module))
            mlps += 1
        elif all(hasattr(module, n) for n in QKVGroup.names) and not hasattr(module, "_mtool_qkv_group") and \
                fusable(module, QKVGroup.names):
            group = QKVGroup(module)
            module._mtool_qkv_group = group
            for name in QKVGroup.names:
                projection = getattr(module, name)
                projection.__class__ = grouped_projection_class(type(projection))
                projection._mtool_qkv_group = group
                projection._mtool_qkv_name = name
            attentions += 1
    return mlps, attentions
