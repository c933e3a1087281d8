"""Peak training memory, predicted from the model's config.json and the run's settings (no weights loaded).

The prediction is the peak of *allocated tensor memory* on the training device during a step (forward,
backward, optimizer update), the quantity ``torch.cuda.max_memory_allocated`` reports, as the sum of:

weights
    4-bit linear layers: 0.5 byte per parameter plus the block scales (one byte per 64 weights and a float32
    per 256 blocks with double quantization, else a float32 per 64 weights); everything else (embeddings,
    output head, norms) in the compute dtype ``c``. Plain LoRA: every parameter in ``c``.
lora
    the trainable parameters (float32) and their gradients (float32); ``modules_to_save`` copies in ``c``.
    Per adapted linear ``d_in -> d_out``: ``r (d_in + d_out)`` parameters (DoRA: ``+ d_out``).
optimizer
    AdamW: two float32 states per parameter (8 bytes); 8-bit AdamW: 2 bytes plus block scales for tensors
    of at least 4096 elements, 8 bytes for smaller ones.
activations
    what the backward pass needs, for ``T = micro_batch_size * seq_len`` tokens. Per decoder layer and token
    (bytes; ``h`` hidden, ``f`` MLP width, ``q = heads * head_dim``, ``k = kv_heads * head_dim``):
    the two RMSNorms keep a float32 copy of their input and the inverse RMS, ``2 (4h + 4)``; each LoRA keeps its
    float32 input (one shared copy per input when ``c`` is float32: ``4 (2h + f)``; one per adapted module
    otherwise: ``4 (5h + q + f)`` for all seven) and its rank-``r`` float32 intermediate ``4r``; attention keeps
    query, key, value and output in ``c`` and a float32 log-sum-exp per head, ``c (2q + 2k) + 4 heads`` (keys and
    values repeated to ``q`` when a padding or packing mask is in play); the MLP keeps the gate, its activation
    and the up projection, ``3 c f``. Dropout adds a float32 copy and a mask per adapted module.
    With gradient checkpointing the layers keep only their inputs (``c h`` per token) and one layer at a time
    is recomputed in full (plus its gradient buffers and, for QLoRA, the dequantized weight of its largest
    linear layer); without it every layer keeps everything.
logits
    the output head's logits and the cross-entropy around them: ``12 T V`` bytes (the float32 log-softmax kept
    for the backward pass, then two float32 gradients while it is still alive); with
    Liger's fused linear cross-entropy the logits are computed in chunks and this drops to about ``12 T h``.

The CPU run of the test suite checks the sum against the measured peak (see ``measure_training_peak``); a
GPU run additionally has the CUDA context and allocator slack outside allocated memory, which the fit verdict
reserves for (``RESERVED_GIB`` plus ``FRAGMENTATION`` of the estimate).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.errors import InputError

if TYPE_CHECKING:
    import torch

    from mtool.train.config import TrainConfig

GIB = 2**30
RESERVED_GIB = 0.6  # CUDA context and libraries, outside the allocator's count
FRAGMENTATION = 0.08  # the caching allocator's slack, as a share of allocated memory
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' optimizer state in 32 bits
BNB_BLOCK = 256  # block size of the 8-bit optimizer states' scales


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer with the Llama layout, from its config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> "ModelShape":
        config = config.get("text_config", config) if "hidden_size" not in config else config
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(hidden=hidden, intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                       tied=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"config.json lacks {error} needed for the memory estimate", where=where,
                             fix="the estimator knows decoder models with the Llama layout (Llama, Mistral, Qwen2, "
                                 "Gemma)") from None

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear modules: name -> (in_features, out_features)."""
        h, f = self.hidden, self.intermediate
        return {"q_proj": (h, self.q), "k_proj": (h, self.kv), "v_proj": (h, self.kv), "o_proj": (self.q, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def linear_parameters(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    def other_parameters(self) -> int:
        """Embeddings, output head (unless tied) and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


@dataclass(frozen=True)
class RunShape:
    """The settings that decide memory (a projection of a TrainConfig, easy to vary for suggestions)."""

    quantization: str  # nf4 / fp4 / none
    double_quant: bool
    compute_bytes: int  # 2 (bf16/fp16) or 4
    rank: int
    targets: tuple[str, ...]
    dora: bool
    dropout: float
    optimizer: str
    micro_batch_size: int
    seq_len: int
    packing: bool
    gradient_checkpointing: bool
    liger: bool
    flash_attention: bool


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of the peak (see the module docstring); ``total`` is their sum."""

    weights: int
    lora: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.optimizer + self.activations + self.logits

    def parts(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("LoRA parameters + gradients", self.lora),
                ("optimizer states", self.optimizer), ("activations", self.activations), ("logits + loss", self.logits)]


def resolved_targets(target_modules: list[str] | str) -> tuple[str, ...]:
    """The decoder-layer linear modules LoRA adapts: all seven for ``all-linear``, else those named."""
    known = ATTENTION_MODULES + MLP_MODULES
    if target_modules == "all-linear":
        return known
    return tuple(name for name in known if name in set(target_modules))


def weight_bytes(model: ModelShape, run: RunShape) -> int:
    """The frozen base: 4-bit linear layers with their block scales, the rest in the compute dtype."""
    c = run.compute_bytes
    if run.quantization == "none":
        return (model.linear_parameters() + model.other_parameters()) * c
    scales = 1 / 64 + 4 / (64 * 256) if run.double_quant else 4 / 64
    return math.ceil(model.linear_parameters() * (0.5 + scales)) + model.other_parameters() * c


def lora_tensor_sizes(model: ModelShape, run: RunShape) -> list[int]:
    """Element counts of every trainable tensor (A, B, and DoRA magnitudes) of the whole model."""
    sizes = []
    for name in run.targets:
        d_in, d_out = model.linear_shapes()[name]
        sizes += [run.rank * d_in, run.rank * d_out] + ([d_out] if run.dora else [])
    return sizes * model.layers


def optimizer_bytes_per_tensor(elements: int, optimizer: str) -> float:
    """Two AdamW states: 8 bytes per element; 8-bit: 2 bytes plus a float32 scale per block of 256 for each state."""
    if optimizer.endswith("8bit") and elements >= BNB_MIN_8BIT_SIZE:
        return elements * 2 + 2 * 4 * math.ceil(elements / BNB_BLOCK)
    return elements * 8


def layer_activation_bytes(model: ModelShape, run: RunShape) -> int:
    """Bytes one decoder layer keeps for the backward pass, for ``T`` tokens (see the module docstring)."""
    h, f, q, c = model.hidden, model.intermediate, model.q, run.compute_bytes
    tokens = run.micro_batch_size * run.seq_len
    shapes = model.linear_shapes()
    targets = set(run.targets)
    norms = 2 * ((c if run.liger else 4) * h + 4)
    lora_inputs = 0
    groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
    for group in groups:
        adapted = [name for name in group if name in targets]
        if not adapted:
            continue
        d_in = shapes[adapted[0]][0]
        if c == 4:  # one float32 input shared by the group; o_proj's is the attention output, counted below
            lora_inputs += 0 if group == ("o_proj",) else 4 * d_in
        else:  # each module casts its input to float32
            lora_inputs += 4 * d_in * len(adapted)
    lora_hidden = 4 * run.rank * len(targets)
    dropout = sum(5 * shapes[name][0] for name in targets) if run.dropout > 0 else 0
    kv = model.kv if (run.flash_attention or not _attention_mask_in_play(run)) else q
    attention = c * (2 * q + 2 * kv) + 4 * model.heads
    mlp = (2 if run.liger else 3) * c * f
    per_token = norms + lora_inputs + lora_hidden + dropout + attention + mlp
    return per_token * tokens


def _attention_mask_in_play(run: RunShape) -> bool:
    """SDPA gets an explicit mask (and repeats keys/values per head) for padded or packed micro-batches."""
    return run.packing or run.micro_batch_size > 1


def attention_mask_bytes(run: RunShape) -> int:
    """The 4-D mask SDPA receives: a boolean and an additive copy in the compute dtype per query/key pair."""
    if run.flash_attention or not _attention_mask_in_play(run):
        return 0
    tokens = run.micro_batch_size * run.seq_len
    pairs = tokens * tokens if run.packing else run.micro_batch_size * run.seq_len * run.seq_len
    return pairs * (1 + run.compute_bytes)


def logits_bytes(model: ModelShape, run: RunShape) -> int:
    tokens = run.micro_batch_size * run.seq_len
    if run.liger:
        return 12 * tokens * model.hidden
    return 12 * tokens * model.vocab


def estimate_memory(model: ModelShape, run: RunShape) -> MemoryEstimate:
    """The predicted peak of allocated memory of a training step, by part."""
    c = run.compute_bytes
    tokens = run.micro_batch_size * run.seq_len
    sizes = lora_tensor_sizes(model, run)
    lora = sum(sizes) * 4 * 2
    optimizer = math.ceil(sum(optimizer_bytes_per_tensor(n, run.optimizer) for n in sizes))
    layer = layer_activation_bytes(model, run)
    logits = logits_bytes(model, run)
    final_norm = tokens * (4 * model.hidden + 4)
    mask = attention_mask_bytes(run)
    if run.gradient_checkpointing:
        stored = model.layers * tokens * model.hidden * c
        dequantized = max(i * o for i, o in model.linear_shapes().values()) * c if run.quantization != "none" else 0
        recompute = layer + 2 * tokens * model.hidden * c + dequantized
        activations = stored + final_norm + mask + max(0, recompute - logits - final_norm)
    else:
        activations = model.layers * layer + final_norm + mask
    return MemoryEstimate(weight_bytes(model, run), lora, optimizer, activations, logits)


# ---------------------------------------------------------------------------------------------------
# From a training config


def run_shape(config: "TrainConfig", *, device_type: str, liger_available: bool) -> RunShape:
    """The memory-relevant settings of ``config`` on a ``cuda`` or ``cpu`` device."""
    dtype = config.model.compute_dtype
    compute_bytes = 4 if dtype == "float32" or (dtype == "auto" and device_type == "cpu") else 2
    liger = device_type == "cuda" and (config.model.liger == "on" or (config.model.liger == "auto" and liger_available))
    return RunShape(quantization=config.model.quantization, double_quant=config.model.double_quant,
                    compute_bytes=compute_bytes, rank=config.lora.rank,
                    targets=resolved_targets(config.lora.target_modules), dora=config.lora.dora,
                    dropout=config.lora.dropout, optimizer=config.training.optimizer,
                    micro_batch_size=config.training.micro_batch_size, seq_len=config.data.seq_len,
                    packing=config.data.packing, gradient_checkpointing=config.model.gradient_checkpointing,
                    liger=liger, flash_attention=config.model.attention == "flash_attention_2")


def read_model_shape(model_path: Path) -> ModelShape:
    from mtool.lora.adapter import refuse_adapter

    folder = model_path if model_path.is_dir() else model_path.parent
    refuse_adapter(folder, what="a base model (--base)")
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read config.json: {error}", where=str(folder)) from None
    return ModelShape.from_config(config, str(path))


@dataclass(frozen=True)
class ConfigEstimate:
    model: ModelShape
    run: RunShape
    estimate: MemoryEstimate


def estimate_for_config(config: "TrainConfig", model_path: Path, *, device: "torch.device | None" = None,
                        device_type: str | None = None) -> ConfigEstimate:
    import importlib.util

    kind = device_type or (device.type if device is not None else "cuda")
    model = read_model_shape(Path(model_path))
    run = run_shape(config, device_type=kind, liger_available=importlib.util.find_spec("liger_kernel") is not None)
    return ConfigEstimate(model, run, estimate_memory(model, run))


# ---------------------------------------------------------------------------------------------------
# Measuring


def measure_peak_bytes(step: Callable[[], Any], resident: list["torch.Tensor"], device: "torch.device") -> int:
    """The measured counterpart of :func:`estimate_memory`: peak allocated bytes while ``step()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated`` around the step. CPU (which keeps no such counter): the bytes of
    the ``resident`` tensors before the step (weights, trainable parameters, optimizer states; each storage
    counted once) plus the highest running sum of the allocations minus frees that the PyTorch profiler
    records during the step.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    storages: dict[int, int] = {}
    for tensor in resident:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return sum(storages.values()) + peak
