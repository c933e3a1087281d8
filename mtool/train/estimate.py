"""Peak training memory, predicted from the model's config.json and the run's settings (no weights loaded).

The prediction is the peak of *allocated tensor memory* on one training device during a step (forward,
backward, optimizer update), the quantity ``torch.cuda.max_memory_allocated`` reports, as the sum of:

weights
    4-bit linear layers: 0.5 byte per parameter plus the block scales (one byte per 64 weights and a float32
    per 256 blocks with double quantization, else a float32 per 64 weights); everything else (embeddings,
    output head, norms) in the compute dtype ``c``. Plain LoRA: every parameter in ``c``. FSDP over ``P``
    processes: ``1/P`` of it, plus two decoder layers gathered in full (the one computing, the next arriving).
lora
    the trainable parameters (float32) and their gradients (float32); ``modules_to_save`` copies in ``c``.
    Per adapted linear ``d_in -> d_out``: ``r (d_in + d_out)`` parameters (DoRA: ``+ d_out``). FSDP: ``1/P``.
optimizer
    AdamW: two float32 states per parameter (8 bytes); 8-bit AdamW: 2 bytes plus block scales for tensors
    of at least 4096 elements, 8 bytes for smaller ones. FSDP: ``1/P``.
activations
    what the backward pass needs, for ``T = micro_batch_size * seq_len`` tokens. Per decoder layer and token
    (bytes; ``h`` hidden, ``f`` MLP width, ``q = heads * head_dim``, ``k = kv_heads * head_dim``):
    the two RMSNorms keep a float32 copy of their input and the inverse RMS, ``2 (4h + 4)``; attention keeps
    query, key, value and output in ``c`` and a float32 log-sum-exp per head, ``c (2q + 2k) + 4 heads`` (keys and
    values repeated to ``q`` when a padding or packing mask is in play); each LoRA its rank-``r`` float32
    intermediate ``4r``. The lean layers (default) keep each projection input once in ``c`` (``c (2h + q)`` for
    the q/k/v, o and gate/up inputs) and the fused SwiGLU MLP its gate and up outputs, ``2 c f``; PEFT's layers
    keep a float32 input per adapted module (one shared copy per input when ``c`` is float32:
    ``4 (2h + f)``; else ``4 (5h + q + f)`` for all seven) and the MLP the gate, its activation and the up
    projection, ``3 c f``. Dropout adds a mask per adapted module (PEFT: and a float32 copy).
    With gradient checkpointing the layers keep only their inputs (``c h`` per token; with offloading, two
    layers' worth on the device) and one layer at a time is recomputed in full (plus its gradient buffers and,
    for QLoRA, the dequantized weight of its largest linear layer); without it every layer keeps everything.
logits
    full logits: ``12 T V`` bytes (the float32 log-softmax kept for the backward pass, then two float32
    gradients while it is still alive). The chunked loss (default, :mod:`mtool.train.chunked_loss`) holds one
    chunk of ``R`` rows at a time, ``4 R V`` (plus ``c R V`` for 16-bit logits before their float32 copy), and
    ``2 c T h`` for the trained positions' hidden states and their gradient; Liger's fused linear
    cross-entropy about ``12 T h``.

The CPU run of the test suite checks the sum against the measured peak (:mod:`mtool.train.measure`); a GPU
run additionally has the CUDA context and allocator slack outside allocated memory, which the fit verdict
reserves for (``RESERVED_GIB`` plus ``FRAGMENTATION`` of the estimate).
"""

from __future__ import annotations

import json
import math
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
    lean_layers: bool = False
    loss: str = "full"  # "full" logits, mtool's "chunked" loss, or Liger's fused "liger" loss
    offload: bool = False  # checkpointed layer inputs in host memory (CUDA)
    processes: int = 1
    fsdp: bool = False  # parameters, gradients and optimizer states sharded over the processes


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


def _fused_blocks(run: RunShape) -> bool:
    """The lean layers fuse the MLP and q/k/v nodes when no module has dropout or DoRA."""
    return run.lean_layers and run.dropout == 0 and not run.dora


def _lora_input_bytes(model: ModelShape, run: RunShape) -> int:
    """Per token and layer: what the LoRA layers keep of their inputs (see the module docstring)."""
    shapes = model.linear_shapes()
    targets = set(run.targets)
    c = run.compute_bytes
    total = 0
    groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
    for group in groups:
        adapted = [name for name in group if name in targets]
        if not adapted:
            continue
        d_in = shapes[adapted[0]][0]
        if run.lean_layers:  # one input per group in the compute dtype; the fused MLP keeps none for down_proj
            total += 0 if (group == ("down_proj",) and _fused_blocks(run)) else c * d_in
        elif c == 4:  # one float32 input shared by the group; o_proj's is the attention output, counted apart
            total += 0 if group == ("o_proj",) else 4 * d_in
        else:  # each module casts its input to float32
            total += 4 * d_in * len(adapted)
    return total


def layer_activation_bytes(model: ModelShape, run: RunShape) -> int:
    """Bytes one decoder layer keeps for the backward pass, for ``T`` tokens (see the module docstring)."""
    h, f, q, c = model.hidden, model.intermediate, model.q, run.compute_bytes
    tokens = run.micro_batch_size * run.seq_len
    shapes = model.linear_shapes()
    targets = set(run.targets)
    norms = 2 * ((c if run.liger else 4) * h + 4)
    lora_hidden = 4 * run.rank * len(targets)
    dropout = 0
    if run.dropout > 0:  # a mask per module; PEFT also a float32 copy of the input
        dropout = sum((1 if run.lean_layers else 5) * shapes[name][0] for name in targets)
    dora = sum(c * shapes[name][1] for name in targets) if run.dora and run.lean_layers else 0
    kv = model.kv if (run.flash_attention or not _attention_mask_in_play(run)) else q
    attention = c * (2 * q + 2 * kv) + 4 * model.heads
    mlp = (2 if run.liger or _fused_blocks(run) else 3) * c * f
    per_token = norms + _lora_input_bytes(model, run) + lora_hidden + dropout + dora + attention + mlp
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
    """The loss's peak (see the module docstring)."""
    from mtool.train.chunked_loss import chunk_rows

    tokens = run.micro_batch_size * run.seq_len
    c = run.compute_bytes
    if run.loss == "liger":
        return 12 * tokens * model.hidden
    if run.loss == "chunked":
        rows = min(tokens, chunk_rows(tokens, model.vocab, model.hidden))
        return rows * model.vocab * (4 + (c if c < 4 else 0)) + 2 * c * tokens * model.hidden
    return 12 * tokens * model.vocab


def layer_weight_bytes(model: ModelShape, run: RunShape) -> int:
    """One decoder layer's frozen weights (4-bit linear layers with their scales, two norms in ``c``)."""
    per_parameter = run.compute_bytes if run.quantization == "none" else \
        0.5 + (1 / 64 + 4 / (64 * 256) if run.double_quant else 4 / 64)
    linear = sum(i * o for i, o in model.linear_shapes().values())
    return math.ceil(linear * per_parameter) + 2 * model.hidden * run.compute_bytes


def estimate_memory(model: ModelShape, run: RunShape) -> MemoryEstimate:
    """The predicted peak of allocated memory of a training step on one device, by part."""
    c = run.compute_bytes
    tokens = run.micro_batch_size * run.seq_len
    sizes = lora_tensor_sizes(model, run)
    shards = run.processes if run.fsdp else 1
    lora = math.ceil(sum(sizes) * 4 * 2 / shards)
    optimizer = math.ceil(sum(optimizer_bytes_per_tensor(n, run.optimizer) for n in sizes) / shards)
    weights = weight_bytes(model, run)
    if shards > 1:  # each process its shard, plus the layer being computed and the next one, gathered in full
        weights = math.ceil(weights / shards) + 2 * layer_weight_bytes(model, run)
    layer = layer_activation_bytes(model, run)
    logits = logits_bytes(model, run)
    final_norm = tokens * (4 * model.hidden + 4)
    mask = attention_mask_bytes(run)
    if run.gradient_checkpointing:
        kept_layers = min(model.layers, 2) if run.offload else model.layers
        stored = kept_layers * tokens * model.hidden * c
        dequantized = max(i * o for i, o in model.linear_shapes().values()) * c if run.quantization != "none" else 0
        recompute = layer + 2 * tokens * model.hidden * c + dequantized
        activations = stored + final_norm + mask + max(0, recompute - logits - final_norm)
    else:
        activations = model.layers * layer + final_norm + mask
    return MemoryEstimate(weights, lora, optimizer, activations, logits)


# ---------------------------------------------------------------------------------------------------
# From a training config


def run_shape(config: "TrainConfig", *, device_type: str, liger_available: bool, processes: int = 1) -> RunShape:
    """The memory-relevant settings of ``config`` on a ``cuda`` or ``cpu`` device, run by ``processes``."""
    settings = config.model
    dtype = settings.compute_dtype
    compute_bytes = 4 if dtype == "float32" or (dtype == "auto" and device_type == "cpu") else 2
    liger = device_type == "cuda" and (settings.liger == "on" or (settings.liger == "auto" and liger_available))
    loss = "full" if settings.loss == "full" else ("liger" if liger else "chunked")
    return RunShape(quantization=settings.quantization, double_quant=settings.double_quant,
                    compute_bytes=compute_bytes, rank=config.lora.rank,
                    targets=resolved_targets(config.lora.target_modules), dora=config.lora.dora,
                    dropout=config.lora.dropout, optimizer=config.training.optimizer,
                    micro_batch_size=config.training.micro_batch_size, seq_len=config.data.seq_len,
                    packing=config.data.packing, gradient_checkpointing=settings.gradient_checkpointing,
                    liger=liger, flash_attention=settings.attention == "flash_attention_2",
                    lean_layers=settings.lean_layers, loss=loss,
                    offload=settings.offload_activations and settings.gradient_checkpointing and device_type == "cuda",
                    processes=processes, fsdp=config.training.parallelism == "fsdp" and processes > 1)


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
                        device_type: str | None = None, processes: int = 1) -> ConfigEstimate:
    import importlib.util

    kind = device_type or (device.type if device is not None else "cuda")
    model = read_model_shape(Path(model_path))
    run = run_shape(config, device_type=kind, liger_available=importlib.util.find_spec("liger_kernel") is not None,
                    processes=processes)
    return ConfigEstimate(model, run, estimate_memory(model, run))
