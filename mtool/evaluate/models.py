"""The models ``mtool eval`` scores: a model folder (or Hub id), or a PEFT adapter on its base; the device and
dtype they run in; and the memory check made before any weight is loaded.

Memory: a model needs its floating-point tensors at the evaluation dtype (numel x itemsize, read from the
safetensors headers) plus its other tensors as stored, and an adapter the same on top of its base. When that
exceeds the memory the device has free (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable``), loading
is refused with the numbers and what to do, before a byte is read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.errors import InputError
from mtool.hub import ModelRef, resolve_model
from mtool.io.reading import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    import torch

GIB = 2**30


@dataclass
class LoadedModel:
    """A model ready to score, with where it came from."""

    model: Any
    tokenizer: Any
    ref: ModelRef  # the model, or the adapter
    base: ModelRef | None  # an adapter's base
    device: "torch.device"
    dtype: "torch.dtype"

    @property
    def label(self) -> str:
        return self.ref.id if self.base is None else f"{self.ref.id} on {self.base.id}"


def resolve_device(setting: str) -> "torch.device":
    """``auto``: the first CUDA GPU when there is one, else the CPU; otherwise the device named."""
    import torch

    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise InputError(f"unknown device {setting!r}", where="--device", fix="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{setting} was asked for but no CUDA GPU is available", where="--device",
                         fix="use --device cpu")
    return device


def resolve_dtype(setting: str, device: "torch.device") -> "torch.dtype":
    """``auto``: bfloat16 on a GPU that supports it (float16 on an older one), float32 on CPU (as training)."""
    from mtool.train.model import resolve_compute_dtype

    return resolve_compute_dtype(setting, device)


def weight_bytes(checkpoint: Checkpoint, dtype: "torch.dtype") -> int:
    """Bytes the checkpoint's tensors take once loaded: floating tensors at ``dtype``, the others as stored."""
    return sum(info.numel * dtype.itemsize if info.dtype.is_floating_point else info.nbytes
               for info in checkpoint.tensors.values())


def free_memory(device: "torch.device") -> int | None:
    """Bytes free on ``device`` (None when unknown)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(label: str, needed: int, device: "torch.device", dtype: "torch.dtype",
               free: int | None = None) -> None:
    """Refuse to load ``needed`` bytes of weights that ``device`` has no room for."""
    free = free_memory(device) if free is None else free
    if free is not None and needed > free:
        dtype_name = str(dtype).removeprefix("torch.")
        raise InputError(f"{label} is too large for the memory: its weights need {needed / GIB:.1f} GiB in "
                         f"{dtype_name}, and {device} has {free / GIB:.1f} GiB free",
                         fix="evaluate it on a device with more memory (--device), in a smaller dtype "
                             "(--dtype bfloat16), or free some memory")


def _adapter_base(adapter: ModelRef, checkpoint: Checkpoint, base: str | None) -> ModelRef:
    reference = base or (checkpoint.read_json("adapter_config.json") or {}).get("base_model_name_or_path")
    if not reference:
        raise InputError("this is a LoRA adapter and its config names no base model", where=adapter.id,
                         fix="give the base with --base")
    return resolve_model(str(reference))


def load_model(reference: str, *, base: str | None, device: "torch.device", dtype: "torch.dtype") -> LoadedModel:
    """Load ``reference`` (a model, or an adapter on ``base`` / the base its config names) for scoring, after
    checking it fits the device's free memory. Remote code never runs; pickle weights are refused."""
    ref = resolve_model(reference)
    checkpoint = open_checkpoint(ref.path)
    base_ref = base_checkpoint = None
    if checkpoint.is_adapter:
        base_ref = _adapter_base(ref, checkpoint, base)
        base_checkpoint = open_checkpoint(base_ref.path)
    needed = weight_bytes(checkpoint, dtype) + (weight_bytes(base_checkpoint, dtype) if base_checkpoint else 0)
    label = ref.id if base_ref is None else f"{ref.id} on {base_ref.id}"
    check_fits(label, needed, device, dtype)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from mtool.train.tokenizer import load_tokenizer

    transformers_logging.disable_progress_bar()
    model_folder = base_checkpoint.folder if base_checkpoint is not None else checkpoint.folder
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype, **placement)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the model: {str(error).strip().splitlines()[0]}", where=str(model_folder)) \
            from None
    tokenizer_folder = checkpoint.folder
    if base_checkpoint is not None and not (checkpoint.folder / "tokenizer_config.json").is_file():
        tokenizer_folder = base_checkpoint.folder
    tokenizer = load_tokenizer(str(tokenizer_folder))
    if base_checkpoint is not None:
        from peft import PeftModel

        from mtool.train.model import resize_for_tokenizer

        resize_for_tokenizer(model, tokenizer)  # an adapter trained with added tokens carries their rows
        model = PeftModel.from_pretrained(model, checkpoint.folder, torch_device=str(device))
    model.to(device)
    return LoadedModel(model.eval(), tokenizer, ref, base_ref, device, dtype)
