"""The model being trained: a base (4-bit or 16/32-bit) with LoRA adapters, loaded lean.

Lean means: the base is loaded straight in its compute dtype (NF4/FP4 for the linear layers of a QLoRA run);
frozen embeddings, norms and the output head are *not* upcast to float32 (``peft``'s
``prepare_model_for_kbit_training`` does that and costs gigabytes on large vocabularies); only the trainable
LoRA matrices are float32. Gradient checkpointing is non-reentrant and the embedding output requires grad,
so every LoRA matrix receives a gradient even under checkpointing. On CUDA, Liger's fused kernels (RMSNorm,
RoPE, SwiGLU and a linear + cross-entropy that never materializes the logits) are applied when installed.

New tokens (``data.add_tokens``, or the ``<|...|>`` markers of a named chat template that the vocabulary
lacks) resize the embeddings, and the embedding and output layers are then trained in full and saved with
the adapter (``modules_to_save``), so the new rows learn and travel with it.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING, Any

from mtool import ui
from mtool.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

    from mtool.train.config import LoraSettings, ModelSettings
    from mtool.train.lean_model import ModelModes


def resolve_compute_dtype(setting: str, device: "torch.device") -> "torch.dtype":
    """``auto``: bfloat16 on a GPU that supports it, float16 on an older GPU, float32 on CPU."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(settings: "ModelSettings", compute_dtype: "torch.dtype", *, shardable: bool = False) -> Any:
    """The ``BitsAndBytesConfig`` of a QLoRA base, or None for plain LoRA. ``shardable``: the packed 4-bit weights
    are stored in the compute dtype (the same bytes, viewed as floats) so FSDP shards them like the others."""
    if settings.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quantization,
                              bnb_4bit_use_double_quant=settings.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype if shardable else "uint8")


def load_base_model(path: str, settings: "ModelSettings", *, compute_dtype: "torch.dtype",
                    device: "torch.device", sharded: bool = False) -> Any:
    """The base causal LM on ``device``, in ``compute_dtype`` (linear layers in 4 bits for QLoRA). ``sharded``
    (FSDP): loaded into host memory with shardable 4-bit storage; sharding moves each process's part to its GPU."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=compute_dtype, attn_implementation=settings.attention,
                                  trust_remote_code=settings.trust_remote_code, revision=settings.revision,
                                  use_safetensors=True)  # never a pickle (the folder was checked before, too)
    quantization = quantization_config(settings, compute_dtype, shardable=sharded)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device.type == "cuda":
        kwargs["device_map"] = {"": "cpu" if sharded else device.index or 0}
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # bitsandbytes announces on every CPU run that an optional kernel package is missing; its own code runs
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as error:
        raise ConfigError(f"cannot load the model: {error}", where="model.attention",
                          fix="install the missing package or use attention: sdpa") from None
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"cannot load the base model: {first}", where=path) from None
    model.config.use_cache = False
    return model


def liger_enabled(setting: str, device: "torch.device") -> bool:
    """Whether to apply the Liger kernels: ``on``, or ``auto`` on CUDA with ``liger-kernel`` installed."""
    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting == "off":
        return False
    if setting == "on":
        if not installed:
            raise ConfigError("model.liger is on but liger-kernel is not installed", where="model.liger",
                              fix="pip install 'mtool[liger]' or set model.liger: auto")
        if device.type != "cuda":
            raise ConfigError("model.liger is on but the Liger kernels need a CUDA GPU", where="model.liger",
                              fix="set model.liger: auto (used when on a GPU)")
        return True
    return installed and device.type == "cuda"


def apply_liger(model: Any, *, swiglu: bool = True, fused_loss: bool = True) -> None:
    """Patch this model instance with Liger's RMSNorm and RoPE, and (as asked) its SwiGLU MLP and fused linear +
    cross-entropy (the lean layers bring their own fused MLP; ``model.loss: full`` keeps the logits)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, swiglu=swiglu, fused_linear_cross_entropy=fused_loss)


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing of every decoder layer, with the embedding output requiring grad."""
    options = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:  # transformers < 5.20
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.enable_input_require_grads()


def embedding_module_names(model: Any) -> list[str]:
    """The short names (as ``modules_to_save`` wants them) of the input embedding and the output head."""
    names = []
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    for module in wanted:
        if module is None:
            continue
        for name, candidate in model.named_modules():
            if candidate is module:
                names.append(name.rsplit(".", 1)[-1])
                break
    return list(dict.fromkeys(names))


def resize_for_tokenizer(model: Any, tokenizer: Any) -> bool:
    """Grow the embeddings to the tokenizer's length when tokens were added; True when resized."""
    size = len(tokenizer)
    if size <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(size, mean_resizing=True)
    return True


def linear_module_names(model: Any) -> list[str]:
    """``all-linear``: the short names of every linear layer (4-bit ones included) except the output head,
    so the saved ``adapter_config.json`` lists ``q_proj``, ``up_proj``... rather than every layer's path."""
    import torch

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def attach_lora(model: Any, settings: "LoraSettings", *, extra_modules_to_save: list[str]) -> Any:
    """Wrap ``model`` with trainable LoRA adapters (float32 matrices) -> a ``peft.PeftModel``."""
    from peft import LoraConfig, get_peft_model

    modules_to_save = list(dict.fromkeys(settings.modules_to_save + extra_modules_to_save)) or None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    targets = linear_module_names(model) if settings.target_modules == "all-linear" else settings.target_modules
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.resolved_alpha, lora_dropout=settings.dropout,
        target_modules=targets, use_rslora=settings.rslora, use_dora=settings.dora,
        modules_to_save=modules_to_save, ensure_weight_tying=tied and modules_to_save is not None,
        bias="none", task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="peft")
            warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' checkpointing rename
            return get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as error:
        raise ConfigError(f"cannot attach LoRA: {error}", where="lora.target_modules",
                          fix="name modules that exist in the model, e.g. [q_proj, v_proj]") from None


def build_model(base_path: str, tokenizer: Any, model_settings: "ModelSettings", lora_settings: "LoraSettings", *,
                device: "torch.device", seed: int, sharded: bool = False) -> tuple[Any, "ModelModes"]:
    """Load the base, resize it for added tokens, apply Liger/checkpointing, attach LoRA (seeded), then the
    memory modes (:mod:`mtool.train.lean_model`). ``sharded``: prepared for FSDP (see :func:`load_base_model`).

    Returns ``(peft_model, modes)``.
    """
    import torch

    from mtool.train.lean_model import apply_model_modes

    compute_dtype = resolve_compute_dtype(model_settings.compute_dtype, device)
    model = load_base_model(base_path, model_settings, compute_dtype=compute_dtype, device=device, sharded=sharded)
    torch.manual_seed(seed)
    extra = []
    if resize_for_tokenizer(model, tokenizer):
        extra = embedding_module_names(model)
        ui.info(f"embeddings resized to {len(tokenizer)} tokens; {', '.join(extra)} trained in full and saved")
    use_liger = liger_enabled(model_settings.liger, device)
    if use_liger:
        apply_liger(model, swiglu=not model_settings.lean_layers, fused_loss=model_settings.loss == "chunked")
    if model_settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    peft_model = attach_lora(model, lora_settings, extra_modules_to_save=extra)
    peft_model.train()
    return peft_model, apply_model_modes(peft_model, model_settings, device, liger=use_liger)


def trainable_parameters(model: Any) -> list["torch.nn.Parameter"]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]
