"""The memory modes of a model under training, switched on after LoRA is attached (see docs/train.md).

- ``model.lean_layers`` (default on): every PEFT LoRA layer becomes the lean node of :mod:`.lean_lora`, and the
  SwiGLU MLPs and q/k/v projections of Llama-family layers the fused nodes of :mod:`.fused_blocks`.
- ``model.loss: chunked`` (default): the loss comes from the hidden states in chunks, never as
  ``[tokens, vocabulary]`` logits: Liger's fused linear cross-entropy where Liger is applied (CUDA), else
  :mod:`.lm_loss`.
- ``model.kernels: triton``: the lean nodes run their 4-bit products and SwiGLU in :mod:`.kernels` (CUDA).
- ``model.offload_activations``: the checkpointed layers' inputs wait in pinned host memory (:mod:`.offload`).

Each is exact: the same loss and gradients as the plain stack up to rounding order (tested against float64
references), so they change memory and speed, never what is learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtool import ui
from mtool.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from mtool.train.config import ModelSettings


@dataclass(frozen=True)
class ModelModes:
    """What was switched on for a run (for the log line, the lineage record and the benchmark)."""

    liger: bool = False
    lean_layers: int = 0  # PEFT LoRA layers on the lean node
    fused_mlps: int = 0
    fused_attention: int = 0
    loss: str = "full"  # "chunked" (mtool), "liger", or "full" (the model's own logits)
    kernels: str = "torch"
    offloaded_layers: int = 0

    def describe(self) -> str:
        parts = []
        if self.lean_layers:
            parts.append(f"lean LoRA layers ({self.lean_layers}; {self.fused_mlps} fused MLPs, "
                         f"{self.fused_attention} fused q/k/v)")
        parts.append({"chunked": "chunked loss", "liger": "Liger fused loss", "full": "full logits"}[self.loss])
        if self.kernels == "triton":
            parts.append("Triton kernels")
        if self.liger:
            parts.append("Liger kernels")
        if self.offloaded_layers:
            parts.append(f"offloaded checkpoints ({self.offloaded_layers} layers)")
        return ", ".join(parts)

    def as_record(self) -> dict[str, Any]:
        return {"liger_kernels": self.liger, "lean_layers": self.lean_layers > 0, "loss": self.loss,
                "kernels": self.kernels, "offloaded_activations": self.offloaded_layers > 0}


def causal_lm_of(peft_model: Any) -> Any:
    """The transformers causal LM inside a PEFT model."""
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def apply_model_modes(peft_model: Any, settings: "ModelSettings", device: "torch.device", *,
                      liger: bool) -> ModelModes:
    """Switch ``peft_model`` to the modes ``settings`` asks for (after LoRA and checkpointing are in place)."""
    from mtool.train import kernels

    lean = fused_mlps = fused_attention = 0
    if settings.lean_layers:
        from mtool.train.fused_blocks import fuse_blocks
        from mtool.train.lean_lora import make_lora_layers_lean

        lean = make_lora_layers_lean(peft_model)
        fused_mlps, fused_attention = fuse_blocks(peft_model)
    loss = "full"
    if settings.loss == "chunked":
        from mtool.train.lm_loss import use_chunked_loss

        model = causal_lm_of(peft_model)
        if "forward" in vars(model) and liger:
            loss = "liger"  # Liger's fused linear cross-entropy, set on the instance by apply_liger
        elif use_chunked_loss(model):
            loss = "chunked"
        else:
            ui.debug(f"the chunked loss does not cover {getattr(model.config, 'model_type', '?')}; full logits")
    kernels.set_enabled(False)
    if settings.kernels == "triton":
        if device.type != "cuda" or not kernels.triton_installed():
            raise ConfigError("model.kernels triton needs a CUDA GPU and the triton package", where="model.kernels",
                              fix="set model.kernels: torch")
        kernels.set_enabled(True)
    offloaded = 0
    if settings.offload_activations:
        if not settings.gradient_checkpointing:
            raise ConfigError("model.offload_activations keeps the inputs of checkpointed layers in host memory and "
                              "needs gradient checkpointing", where="model.offload_activations",
                              fix="set model.gradient_checkpointing: true (or offload_activations: false)")
        from mtool.train.offload import ActivationOffloader, offload_checkpointed_layers

        offloaded = offload_checkpointed_layers(peft_model, ActivationOffloader())
        if device.type != "cuda":
            ui.info("model.offload_activations: on a CPU the activations already live in host memory; the layers are "
                    "checkpointed as usual")
    return ModelModes(liger=liger, lean_layers=lean, fused_mlps=fused_mlps, fused_attention=fused_attention,
                      loss=loss, kernels=settings.kernels, offloaded_layers=offloaded)
