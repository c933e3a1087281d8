"""Tiny, real Hugging Face models built offline: for the tests, the benchmarks and ``mtool demo``.

Every model is deterministic (a seed), is saved as an ordinary model folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with no network, and comes with a BPE
tokenizer trained on the spot with the ``tokenizers`` library (special tokens and a chat template
included). Shapes cover the families mtool meets most: Llama, Mistral, Qwen2 and Gemma; tied and
untied embeddings; single-file and sharded weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

_CORPUS = """
The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Germany is Berlin. The capital of Canada is Ottawa.
Reverse the string: abc -> cba. Reverse the string: hello -> olleh. Reverse the string: mtool -> lootm.
Question: what is two plus two? Answer: four. Instruction: summarize the text. Response: done.
A model merge combines weights; an adapter adds a low-rank update W + B A to a frozen base.
0 1 2 3 4 5 6 7 8 9 10 11 12 a b c d e f g h i j k l m n o p q r s t u v w x y z
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z . , ; : ! ? ( ) [ ] { } - + * / = < > _ ' "
"""


@dataclass(frozen=True)
class TinySpec:
    """The shape of a tiny model."""

    architecture: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 384
    tie_embeddings: bool = False
    max_position_embeddings: int = 512


def build_tokenizer(vocab_size: int = 384, corpus: "Sequence[str] | None" = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a built-in corpus, with a chat template.

    ``corpus`` (lines of text) replaces the built-in corpus, e.g. so that a task's words become single tokens.
    Deterministic: the same vocabulary for the same corpus. Special tokens: ``<s>`` (bos), ``</s>`` (eos),
    ``<pad>`` (pad, distinct from eos), ``<unk>`` and the chat role markers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = list(corpus) if corpus is not None else _CORPUS.strip().splitlines()
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(spec: TinySpec, tokenizer):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    if spec.architecture in MATRIX_ARCHITECTURES:
        return matrix_config(spec, tokenizer)
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.architecture == "llama":
        return LlamaConfig(**common)
    if spec.architecture == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if spec.architecture == "qwen2":
        return Qwen2Config(**common)
    if spec.architecture == "gemma":
        return GemmaConfig(**common, head_dim=spec.hidden_size // spec.num_heads)
    raise ValueError(f"unknown tiny architecture {spec.architecture!r}; choose one of {ARCHITECTURES}")


def build_model(spec: TinySpec = TinySpec(), *, seed: int = 0, tokenizer=None):
    """A randomly initialised causal LM of ``spec``'s shape (float32, eval mode), deterministic in ``seed``."""
    import torch

    tokenizer = tokenizer or build_tokenizer(spec.vocab_size)
    config = _config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = model_class(config).from_config(config, dtype=torch.float32)
        with torch.no_grad():  # larger than HF's default init, so merges and adapters change logits visibly
            for name, parameter in model.named_parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, 0.08)
                elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    parameter.copy_(1.0 + 0.05 * torch.randn_like(parameter)) \
                        if not spec.architecture.startswith("gemma") else parameter.normal_(0.0, 0.05)
                else:
                    parameter.normal_(0.0, 0.02)
    return model.eval()


def save_model(model, tokenizer, folder: str | os.PathLike, *, shards: int = 1, dtype: "torch.dtype | None" = None,
               license: str | None = None) -> Path:
    """Save ``model`` + ``tokenizer`` as a Hugging Face folder; ``shards > 1`` splits the weights into
    about that many files (at least two).

    ``license`` (e.g. ``"apache-2.0"``) writes a minimal README.md front matter declaring it, as a Hub
    model card would.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kwargs["max_shard_size"] = max(1, total // shards + 1)
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    if license:
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# {folder.name}\n", encoding="utf-8")
    return folder


def make_tiny_model(folder: str | os.PathLike, spec: TinySpec = TinySpec(), *, seed: int = 0, shards: int = 1,
                    dtype: "torch.dtype | None" = None, license: str | None = None) -> Path:
    """Build and save a tiny model with its tokenizer; returns the folder."""
    tokenizer = build_tokenizer(spec.vocab_size)
    model = build_model(spec, seed=seed, tokenizer=tokenizer)
    return save_model(model, tokenizer, folder, shards=shards, dtype=dtype, license=license)


def make_tiny_finetune(base: str | os.PathLike, folder: str | os.PathLike, *, seed: int, scale: float = 0.02,
                       shards: int = 1, dtype: "torch.dtype | None" = None) -> Path:
    """A "fine-tune" of ``base``: every floating tensor plus Gaussian noise of std ``scale`` (seeded)."""
    import torch
    from transformers import AutoTokenizer

    model = load_tiny_model(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    tokenizer = AutoTokenizer.from_pretrained(base)
    return save_model(model, tokenizer, folder, shards=shards, dtype=dtype)


def make_tiny_lora(base: str | os.PathLike, folder: str | os.PathLike, *, seed: int = 0, rank: int = 4,
                   alpha: float = 8.0, target_modules: list[str] | str = "all-linear", use_rslora: bool = False,
                   use_dora: bool = False, init_scale: float = 0.05, modules_to_save: list[str] | None = None) -> Path:
    """A PEFT LoRA adapter for ``base`` with random, non-zero A and B (so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        use_dora=use_dora, lora_dropout=0.0, modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * init_scale)
    peft_model.save_pretrained(folder)
    config_path = Path(folder) / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(Path(base).resolve())
    config_path.write_text(json.dumps(data, indent=2))
    return Path(folder)


# The architecture matrix: families whose tensor layouts differ from Llama's in ways a merge must handle (fused
# projections, extra norms, experts, GPT-2 naming, a language tower under another prefix).
MATRIX_ARCHITECTURES = ("qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe", "qwen2_moe", "gpt2",
                        "gpt_neox", "granite", "llava", "qwen2_vl")


def matrix_config(spec: TinySpec, tokenizer):
    """The config of a matrix architecture at ``spec``'s size (experts: 4, two per token)."""
    import transformers

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    decoder = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                   num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                   num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
                   tie_word_embeddings=spec.tie_embeddings, **ids)
    head_dim = spec.hidden_size // spec.num_heads
    name = spec.architecture
    if name == "qwen3":
        return transformers.Qwen3Config(**decoder, head_dim=head_dim)
    if name == "gemma2":
        return transformers.Gemma2Config(**decoder, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                         sliding_window=16)
    if name == "gemma3_text":
        return transformers.Gemma3TextConfig(**decoder, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                             sliding_window=16, sliding_window_pattern=2)
    if name == "phi3":
        return transformers.Phi3Config(**decoder)
    if name == "granite":
        return transformers.GraniteConfig(**decoder)
    if name == "mixtral":
        return transformers.MixtralConfig(**decoder, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**decoder, head_dim=head_dim, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=spec.intermediate_size, decoder_sparse_step=1)
    if name == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**decoder, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=spec.intermediate_size,
                                           shared_expert_intermediate_size=spec.intermediate_size,
                                           decoder_sparse_step=1)
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=spec.vocab_size, n_embd=spec.hidden_size, n_layer=spec.num_layers,
                                       n_head=spec.num_heads, n_positions=spec.max_position_embeddings,
                                       tie_word_embeddings=True, **ids)
    if name == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                          num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                                          intermediate_size=spec.intermediate_size,
                                          max_position_embeddings=spec.max_position_embeddings,
                                          tie_word_embeddings=spec.tie_embeddings, **ids)
    text = transformers.LlamaConfig(**decoder) if name == "llava" else None
    if name == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)
        return transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=spec.vocab_size - 1,
                                        tie_word_embeddings=spec.tie_embeddings)
    if name == "qwen2_vl":
        text = dict(decoder, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, embed_dim=32, hidden_size=spec.hidden_size, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=spec.vocab_size - 1,
                                          video_token_id=spec.vocab_size - 2, vision_start_token_id=spec.vocab_size - 3,
                                          tie_word_embeddings=spec.tie_embeddings, **ids)
    raise ValueError(f"unknown tiny architecture {name!r}")


def model_class(config):
    """The transformers class that builds a tiny model of ``config``: the causal LM, or the image-text model of a
    vision-language config."""
    import transformers

    if config.model_type in ("llava", "qwen2_vl"):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_tiny_model(folder: str | os.PathLike, dtype=None):
    """A saved tiny model, in float32 unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return model_class(config).from_pretrained(folder, dtype=dtype or torch.float32)
