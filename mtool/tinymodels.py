"""Tiny, real Hugging Face models built offline: for the tests, the benchmarks and ``mtool demo``.

Every model is deterministic (a seed), is saved as an ordinary model folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with no network, and comes with a BPE
tokenizer trained on the spot with the ``tokenizers`` library (special tokens and a chat template
included). Shapes cover the families mtool meets most: Llama, Mistral, Qwen2/Qwen3 and Gemma/Gemma 2/Gemma 3;
tied and untied embeddings; single-file and sharded weights; RoPE scaling presets. The tokenizer is byte-level
BPE (GPT-2 style, as Llama 3 and Qwen ship) or, with ``tokenizer="spm"``, SentencePiece-style BPE with byte
fallback (as Llama 2, Mistral and Gemma ship, in the form transformers converts them to).
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

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
TOKENIZERS = ("bpe", "spm")
ROPE_PRESETS = ("default", "linear", "llama3", "yarn")

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
    head_dim: int | None = None  # None: hidden_size / num_heads
    sliding_window: int = 8  # Gemma 2 / Gemma 3: local layers attend to this many tokens
    rope: str = "default"  # one of ROPE_PRESETS (scaled for a context of 64 tokens)
    tokenizer: str = "bpe"  # one of TOKENIZERS


def build_tokenizer(vocab_size: int = 384, corpus: "Sequence[str] | None" = None, *, pre_tokenizer=None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a built-in corpus, with a chat template.

    ``corpus`` (lines of text) replaces the built-in corpus, e.g. so that a task's words become single tokens.
    ``pre_tokenizer`` replaces GPT-2's (``ByteLevel`` without a prefix space), e.g. Llama 3's regex split.
    Deterministic: the same vocabulary for the same corpus. Special tokens: ``<s>`` (bos), ``</s>`` (eos),
    ``<pad>`` (pad, distinct from eos), ``<unk>`` and the chat role markers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def build_spm_tokenizer(vocab_size: int = 384, corpus: "Sequence[str] | None" = None, *,
                        prefix_space: bool = True):
    """A SentencePiece-style BPE ``PreTrainedTokenizerFast``: ``▁`` for spaces, byte fallback (``<0x00>`` ...
    ``<0xFF>``) for characters outside the vocabulary, ``<s>`` added in front, the same special tokens and chat
    template as :func:`build_tokenizer`.

    It has the layout transformers gives a converted ``tokenizer.model`` (Llama 2, Mistral, Gemma): specials,
    then the 256 byte tokens, then the pieces; merges listing every split of every piece into two pieces, in the
    order of the piece's rank (so BPE with these merges and SentencePiece's highest-score-first merging agree).
    ``prefix_space`` prepends ``▁`` to the text (Llama-style ``add_dummy_prefix``); Gemma's has none.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    steps = [normalizers.Prepend("\u2581")] if prefix_space else []
    normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    lines = list(corpus) if corpus is not None else _CORPUS.strip().splitlines()
    specials = list(SPECIAL_TOKENS)
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.normalizer = normalizer
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    pieces_wanted = max(1, vocab_size - len(specials) - 256)
    trainer_tokenizer.train_from_iterator(lines * 4, trainer=trainers.BpeTrainer(vocab_size=pieces_wanted,
                                                                               show_progress=False))
    trained = json.loads(trainer_tokenizer.to_str())["model"]["vocab"]
    pieces = [piece for piece, _ in sorted(trained.items(), key=lambda item: item[1])]
    vocab = {token: index for index, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    rank = {piece: index for index, piece in enumerate(pieces)}
    merges = sorted(((piece[:cut], piece[cut:]) for piece in pieces for cut in range(1, len(piece))
                     if piece[:cut] in rank and piece[cut:] in rank),
                    key=lambda pair: (rank[pair[0] + pair[1]], len(pair[0]), len(pair[1])))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", vocab["<s>"])])
    decoder_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(decoder_steps + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tokenizer_for(spec: TinySpec, corpus: "Sequence[str] | None" = None):
    """The tokenizer ``spec`` asks for: byte-level BPE, or SentencePiece-style (Gemma's without the prefix space)."""
    if spec.tokenizer == "bpe":
        return build_tokenizer(spec.vocab_size, corpus)
    if spec.tokenizer == "spm":
        return build_spm_tokenizer(spec.vocab_size, corpus, prefix_space=not spec.architecture.startswith("gemma"))
    raise ValueError(f"unknown tiny tokenizer {spec.tokenizer!r}; choose one of {TOKENIZERS}")


def _rope_parameters(spec: TinySpec, theta: float = 10000.0) -> dict:
    """RoPE settings of a preset: linear factor 2; llama3 factor 4 and YaRN from an original context of 64 tokens
    to the model's."""
    presets = {
        "default": {"rope_type": "default"},
        "linear": {"rope_type": "linear", "factor": 2.0},
        "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64},
        "yarn": {"rope_type": "yarn", "factor": spec.max_position_embeddings / 64,
                 "original_max_position_embeddings": 64},
    }
    if spec.rope not in presets:
        raise ValueError(f"unknown RoPE preset {spec.rope!r}; choose one of {ROPE_PRESETS}")
    return {**presets[spec.rope], "rope_theta": theta}


def _config(spec: TinySpec, tokenizer):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    if spec.architecture not in ARCHITECTURES and spec.architecture in MATRIX_ARCHITECTURES:
        return matrix_config(spec, tokenizer)
    head_dim = spec.head_dim or spec.hidden_size // spec.num_heads
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
    if spec.rope != "default":
        common["rope_parameters"] = _rope_parameters(spec)
    if spec.head_dim is not None:
        common["head_dim"] = spec.head_dim
    # Gemma 2 / 3: alternate local (sliding window) and global layers; attention scaled by the head size
    gemma_attention = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=spec.sliding_window,
                           layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(spec.num_layers)])
    if spec.architecture == "llama":
        return LlamaConfig(**common)
    if spec.architecture == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if spec.architecture == "qwen2":
        return Qwen2Config(**common)
    if spec.architecture == "qwen3":
        return Qwen3Config(**{**common, "head_dim": head_dim})
    if spec.architecture == "gemma":
        return GemmaConfig(**{**common, "head_dim": head_dim})
    if spec.architecture == "gemma2":
        return Gemma2Config(**{**common, **gemma_attention})
    if spec.architecture == "gemma3":
        rope = common.pop("rope_parameters", {"rope_type": "default"})
        return Gemma3TextConfig(**{**common, **gemma_attention}, rope_parameters={
            "full_attention": {**rope, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    raise ValueError(f"unknown tiny architecture {spec.architecture!r}; choose one of {ARCHITECTURES}")


def build_model(spec: TinySpec = TinySpec(), *, seed: int = 0, tokenizer=None):
    """A randomly initialised causal LM of ``spec``'s shape (float32, eval mode), deterministic in ``seed``."""
    import torch

    tokenizer = tokenizer or tokenizer_for(spec)
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
    tokenizer = tokenizer_for(spec)
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
