"""The tiny-model factory: real HF folders that transformers loads offline, deterministic in their seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtool.io.reading import open_checkpoint
from mtool.tinymodels import ARCHITECTURES, TinySpec, build_tokenizer, make_tiny_model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("tie", [False, True])
def test_every_shape_loads_offline_and_runs(tiny, architecture: str, tie: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny.model(architecture, tie=tie, shards=2 if tie else 1)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type.removesuffix("_text") == architecture  # Gemma 3's language model: gemma3_text
    assert ("lm_head.weight" in open_checkpoint(folder)) is not tie
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_tokenizer_has_distinct_pad_and_eos_and_a_chat_template() -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(tokenizer("Reverse the string: abc").input_ids) == "Reverse the string: abc"


@pytest.mark.parametrize("prefix_space", [True, False])
def test_sentencepiece_style_tokenizer_falls_back_to_bytes_and_round_trips(prefix_space: bool) -> None:
    from mtool.tinymodels import build_spm_tokenizer

    tokenizer = build_spm_tokenizer(prefix_space=prefix_space)
    text = "The capital of France is Paris 日本 🚀"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == ("\u2581The" if prefix_space else "The")
    assert "<0xE6>" in pieces and "<0xF0>" in pieces  # characters outside the vocabulary: their UTF-8 bytes
    assert tokenizer(text).input_ids == [tokenizer.bos_token_id] + ids
    assert tokenizer.decode(ids) == text


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    spec = TinySpec(hidden_size=32, intermediate_size=64)
    first = make_tiny_model(tmp_path / "a", spec, seed=3)
    second = make_tiny_model(tmp_path / "b", spec, seed=3)
    third = make_tiny_model(tmp_path / "c", spec, seed=4)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (third / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (third / "tokenizer.json").read_bytes()
