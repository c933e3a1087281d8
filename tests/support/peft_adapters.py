"""PEFT-made adapters and PEFT's own results, the references the adapter tests compare mtool with."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

PROMPT_IDS = torch.tensor([[1, 9, 23, 57, 88, 140, 7, 301]])


def make_peft_adapter(base: Path, folder: Path, *, seed: int = 0, scale: float = 0.05, model=None,
                      **config) -> Path:
    """Save a PEFT LoRA adapter for ``base`` whose every trainable tensor (LoRA factors, DoRA magnitudes,
    modules_to_save copies, trainable tokens, lora biases) is moved off its initial value (seeded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if folder.exists():
        return folder
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config.setdefault("lora_dropout", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**config))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, parameter in peft_model.named_parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
        peft_model.save_pretrained(folder)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(data, indent=2))
    return folder


def peft_model(base: Path, adapters: list[Path], *, model=None):
    """The base with ``adapters`` loaded by PEFT (all active), float32, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = model if model is not None else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        for number, adapter in enumerate(adapters[1:], start=1):
            wrapped.load_adapter(adapter, adapter_name=f"a{number}")
        if len(adapters) > 1:
            wrapped.base_model.set_adapter([f"a{n}" for n in range(len(adapters))])
    return wrapped.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT_IDS).logits.float()


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
