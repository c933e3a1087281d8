"""Tiny models for the parity suite: mergekit's own test models (pico-Llama with word-level tokenizers of 64
tokens, plus added tokens) and families of bfloat16 fine-tunes whose task vectors, like real ones, hold many
equal magnitudes (low-rank updates of a bfloat16 base, rounded to bfloat16)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def word_tokenizer(vocab_size: int, added_tokens: list[str]):
    """mergekit's test tokenizer: ``<unk> <s> </s> _tok_3 ... _tok_{vocab-1}`` (BPE without merges), then the
    ``added_tokens``."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{index}" for index in range(3, vocab_size)])[:vocab_size]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size))), "merges": []},
            "added_tokens": []}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tokenizer.json")
        tokenizers.Tokenizer.from_str(json.dumps(data)).save(path)
        tokenizer = LlamaTokenizerFast(tokenizer_file=path)
    tokenizer.add_tokens(added_tokens)
    return tokenizer


def pico_llama(folder: Path, *, vocab_size: int = 64, added_tokens: tuple[str, ...] = (), seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """mergekit's pico-Llama (hidden 32, intermediate 48, 16 heads, 2 layers) with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if folder.exists():
        return folder
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                         num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.05 if "norm" in name else 0.1)
    model.to(dtype).save_pretrained(folder)
    word_tokenizer(64, list(added_tokens)).save_pretrained(folder)
    return folder


def low_rank_finetune(base: Path, folder: Path, *, seed: int, rank: int = 4, scale: float = 0.01) -> Path:
    """A "fine-tune" of a bfloat16 ``base``: every matrix plus a rank-``rank`` update ``B A`` (every vector plus
    small noise), rounded to bfloat16; its task vector is a bfloat16 difference with many equal magnitudes."""
    from safetensors.torch import load_file, save_file

    from mtool.io.folders import copy_support_files

    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(Path(base) / "model.safetensors")
    changed = {}
    for name, tensor in sorted(tensors.items()):
        value = tensor.float()
        if value.dim() == 2:
            left = torch.randn(value.shape[0], rank, generator=generator)
            right = torch.randn(rank, value.shape[1], generator=generator)
            value = value + scale * (left @ right) / rank
        else:
            value = value + scale * torch.randn(value.shape, generator=generator)
        changed[name] = value.to(tensor.dtype).contiguous()
    save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
    copy_support_files(base, folder)
    return folder
