"""The model families ``mtool export gguf`` writes, and what llama.cpp needs to know about each.

A Hugging Face ``architectures`` entry picks a :class:`Family`: llama.cpp's architecture (gguf-py's
``MODEL_ARCH``), and what differs between the two implementations:

* Llama and Mistral (``llama``): llama.cpp rotates adjacent pairs of each head's dimensions where transformers
  rotates its two halves, so the rows of ``q_proj`` and ``k_proj`` (and their biases) are permuted head by head:
  ``W.reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2)``.
* Qwen2 and Qwen3 (``qwen2``, ``qwen3``): no change (both rotate halves).
* Gemma, Gemma 2 and Gemma 3: transformers multiplies by ``1 + w`` in its RMS norms, llama.cpp by ``w``: every
  ``*norm.weight`` is written ``+ 1``. Gemma and Gemma 2 have no output matrix in llama.cpp (the head is the
  embedding), so an untied head cannot be exported; Gemma 3's is optional.

The hyperparameters come from ``config.json`` read through transformers' ``AutoConfig`` (which fills the class
defaults and brings transformers 4 configs to the 5 layout), and are checked against what llama.cpp hard-codes:
the activation, the attention scale of Gemma 2/3 (``1/sqrt(head_dim)`` unless the layer count is the 27B model's),
a rotary dimension equal to the head size, no mixture of experts, RoPE scaling it implements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_ARCH

from mtool import ui
from mtool.errors import InputError


@dataclass(frozen=True)
class Family:
    """A model family llama.cpp runs: its architecture and the conversions it needs (module docstring)."""

    label: str
    arch: MODEL_ARCH
    activations: tuple[str, ...]
    permute_qk: bool = False
    norm_plus_one: bool = False
    head_is_embedding: bool = False  # llama.cpp has no output matrix: the head must be the tied embedding
    multimodal: bool = False  # the config nests the language model in text_config; vision tensors are dropped

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_SILU = ("silu", "swish")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("Llama", MODEL_ARCH.LLAMA, _SILU, permute_qk=True),
    "MistralForCausalLM": Family("Mistral", MODEL_ARCH.LLAMA, _SILU, permute_qk=True),
    "Qwen2ForCausalLM": Family("Qwen2", MODEL_ARCH.QWEN2, _SILU),
    "Qwen3ForCausalLM": Family("Qwen3", MODEL_ARCH.QWEN3, _SILU),
    "GemmaForCausalLM": Family("Gemma", MODEL_ARCH.GEMMA, _GELU_TANH, norm_plus_one=True, head_is_embedding=True),
    "Gemma2ForCausalLM": Family("Gemma 2", MODEL_ARCH.GEMMA2, _GELU_TANH, norm_plus_one=True,
                                head_is_embedding=True),
    "Gemma3ForCausalLM": Family("Gemma 3", MODEL_ARCH.GEMMA3, _GELU_TANH, norm_plus_one=True),
    "Gemma3ForConditionalGeneration": Family("Gemma 3", MODEL_ARCH.GEMMA3, _GELU_TANH, norm_plus_one=True,
                                             multimodal=True),
}
# The layer counts at which llama.cpp scales Gemma 2 / Gemma 3 attention by 1/sqrt(hidden / heads) (the 27B models).
_HIDDEN_SCALED_LAYERS = {MODEL_ARCH.GEMMA2: 46, MODEL_ARCH.GEMMA3: 62}
_SUPPORTED_ROPE = ("default", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """The hyperparameters of a language model, as transformers fills them."""

    family: Family
    values: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key)
        return default if value is None else value

    @property
    def layers(self) -> int:
        return int(self.values["num_hidden_layers"])

    @property
    def heads(self) -> int:
        return int(self.values["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.get("num_key_value_heads", self.heads))

    @property
    def hidden(self) -> int:
        return int(self.values["hidden_size"])

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", self.hidden // self.heads))

    @property
    def rope(self) -> dict[str, Any]:
        """The global (full-attention) layers' RoPE parameters, transformers 5 layout."""
        parameters = self.get("rope_parameters", {}) or {}
        return dict(parameters.get("full_attention", parameters))

    @property
    def local_rope_theta(self) -> float | None:
        parameters = self.get("rope_parameters", {}) or {}
        return (parameters.get("sliding_attention") or {}).get("rope_theta")

    @property
    def layer_types(self) -> list[str] | None:
        types = self.get("layer_types")
        return list(types) if isinstance(types, list) and len(types) == self.layers else None


def read_model_config(folder: Path) -> ModelConfig:
    """The family and hyperparameters of the model in ``folder`` (its config.json, through AutoConfig; remote
    code never runs). InputError for an architecture llama.cpp export does not cover."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"cannot read the model's config.json: {str(error).splitlines()[0]}", where=str(folder),
                         fix="give a Hugging Face model folder with its config.json") from None
    architectures = list(getattr(config, "architectures", None) or [])
    family = next((FAMILIES[name] for name in architectures if name in FAMILIES), None)
    if family is None:
        raise InputError(f"GGUF export does not cover {', '.join(architectures) or 'this architecture'}",
                         where=str(folder / "config.json"),
                         fix=f"architectures mtool exports: {', '.join(FAMILIES)} (use llama.cpp's "
                             "convert_hf_to_gguf.py for others)")
    values = config.to_dict()
    if family.multimodal:
        values = {**values, **values.get("text_config", {})}
    return ModelConfig(family, values)


def check_exportable(config: ModelConfig) -> None:
    """Refuse what llama.cpp would compute differently (InputError saying why); warn about what it ignores."""
    family, where = config.family, f"{config.family.label} config"
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation not in family.activations:
        raise InputError(f"the activation {activation!r} is not the one llama.cpp hard-codes for {family.label} "
                         f"({family.activations[0]})", where=where, fix="this model cannot run in llama.cpp as it is")
    if config.get("num_local_experts") or config.get("num_experts"):
        raise InputError("mixture-of-experts models are not exported", where=where,
                         fix="use llama.cpp's convert_hf_to_gguf.py")
    rope_type = config.rope.get("rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE:
        raise InputError(f"RoPE scaling {rope_type!r} is not one llama.cpp implements for {family.label}",
                         where=where, fix=f"supported: {', '.join(_SUPPORTED_ROPE)}")
    if float(config.rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise InputError("partial rotary embeddings are not supported for this architecture in llama.cpp",
                         where=where, fix="this model cannot run in llama.cpp as it is")
    if family.arch in _HIDDEN_SCALED_LAYERS:
        scalar = config.get("query_pre_attn_scalar", config.head_dim)
        expected = (config.hidden // config.heads if config.layers == _HIDDEN_SCALED_LAYERS[family.arch]
                    else config.head_dim)
        if scalar != expected:
            raise InputError(
                f"query_pre_attn_scalar is {scalar}, but llama.cpp scales {family.label} attention by 1/sqrt"
                f"({expected}) for a {config.layers}-layer model", where=where,
                fix="this model cannot run in llama.cpp as it is")
        if family.arch == MODEL_ARCH.GEMMA3 and config.get("attn_logit_softcapping") is not None:
            raise InputError("Gemma 3 with attention logit soft-capping is not what llama.cpp runs", where=where,
                             fix="this model cannot run in llama.cpp as it is")
    window = config.get("sliding_window")
    if family.arch == MODEL_ARCH.LLAMA and window and window < config.get("max_position_embeddings", 0):
        ui.warn(f"{family.label} sliding-window attention ({window} tokens) is not implemented by llama.cpp's "
                f"llama architecture: beyond {window} tokens of context llama.cpp attends to all of them")
    if family.arch == MODEL_ARCH.QWEN2 and config.get("use_sliding_window"):
        ui.warn("Qwen2 sliding-window attention is not implemented by llama.cpp: it attends to the whole context")


def add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """The architecture's keys (``{arch}.block_count`` ...), as llama.cpp's converter writes them."""
    arch = config.family.arch
    writer.add_block_count(config.layers)
    writer.add_context_length(int(config.get("max_position_embeddings", 131072 if arch == MODEL_ARCH.GEMMA3
                                             else 4096)))
    writer.add_embedding_length(config.hidden)
    writer.add_feed_forward_length(int(config.values["intermediate_size"]))
    writer.add_head_count(config.heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    rope = config.rope
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    if arch == MODEL_ARCH.LLAMA:
        writer.add_vocab_size(int(config.values["vocab_size"]))
        writer.add_rope_dimension_count(config.head_dim)
    if arch in (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3):
        _add_sliding_window(writer, config)
    if arch == MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping", 50.0)))
    if arch in (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3) and config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config.values["final_logit_softcapping"]))


def _add_sliding_window(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """Gemma 2 / 3: the window, which layers use it (from ``layer_types``), the local layers' RoPE base."""
    layer_types = config.layer_types
    local = [kind == "sliding_attention" for kind in layer_types] if layer_types else None
    if local is not None and not any(local):
        return  # every layer is global: no window at all
    writer.add_sliding_window(int(config.values["sliding_window"]))
    if local is not None:
        writer.add_sliding_window_pattern(local)
    if config.local_rope_theta is not None:
        writer.add_rope_freq_base_swa(float(config.local_rope_theta))


def llama3_rope_factors(config: ModelConfig) -> np.ndarray | None:
    """Llama 3.x RoPE scaling as llama.cpp takes it: one factor per rotated frequency (``rope_freqs.weight``).

    For each frequency ``f_i = theta^(-2i/d)`` with wavelength ``w = 2 pi / f_i``: 1 when ``w < L / high``,
    ``factor`` when ``w > L / low``, else ``1 / ((1 - s) / factor + s)`` with ``s = (L / w - low) / (high - low)``
    (``L`` the original context length), the formula of transformers' ``_compute_llama3_parameters``.
    """
    rope = config.rope
    if rope.get("rope_type") != "llama3":
        return None
    theta, dim = float(rope.get("rope_theta", 10000.0)), config.head_dim
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for index in range(0, dim, 2):
        wavelength = 2 * math.pi * theta ** (index / dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
