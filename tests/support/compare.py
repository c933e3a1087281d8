"""Comparing two model folders as the parity tests require: the same tensor names, shapes and dtypes; values
within 1e-6 (relative to the tensor's largest magnitude) for float32/float64 tensors and within one rounding
step (adjacent or equal representable values) for 16-bit tensors; the same config.json and tokenizer."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SIXTEEN_BITS = (torch.bfloat16, torch.float16)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(str(Path(folder) / "*.safetensors"))):
        out.update(load_file(file))
    return out


def _ordered_bits(tensor: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in the order of their values (adjacent floats differ by 1)."""
    bits = tensor.view(torch.int16).to(torch.int32) & 0xFFFF
    negative = bits >= 0x8000
    return torch.where(negative, 0x8000 - (bits - 0x8000), bits + 0x8000)


def steps_apart(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable 16-bit values lie between the two (0: equal, 1: adjacent)."""
    return (_ordered_bits(ours) - _ordered_bits(theirs)).abs()


def tensor_difference(ours: torch.Tensor, theirs: torch.Tensor) -> str | None:
    """None when the tensors agree within the parity tolerance, else what differs."""
    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        return f"shape/dtype {list(ours.shape)} {ours.dtype} vs {list(theirs.shape)} {theirs.dtype}"
    if ours.dtype in SIXTEEN_BITS:
        steps = steps_apart(ours, theirs)
        if int(steps.max()) > 1:
            return (f"{int((steps > 1).sum())} of {steps.numel()} entries more than one rounding step apart "
                    f"(at most {int(steps.max())})")
        return None
    scale = theirs.double().abs().max().clamp(min=1e-12)
    error = float((ours.double() - theirs.double()).abs().max() / scale)
    return None if error <= 1e-6 else f"relative difference {error:.2e}"


def model_differences(ours: Path, theirs: Path) -> list[str]:
    """Every way the two folders' weights differ beyond the tolerance."""
    mine, reference = load_tensors(ours), load_tensors(theirs)
    problems = []
    if sorted(mine) != sorted(reference):
        problems.append(f"tensor names: only ours {sorted(set(mine) - set(reference))[:5]}, "
                        f"only mergekit's {sorted(set(reference) - set(mine))[:5]}")
    for name in sorted(set(mine) & set(reference)):
        difference = tensor_difference(mine[name], reference[name])
        if difference:
            problems.append(f"{name}: {difference}")
    return problems


def config_differences(ours: Path, theirs: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys of config.json that differ (transformers' version stamp aside)."""
    mine = json.loads((Path(ours) / "config.json").read_text())
    reference = json.loads((Path(theirs) / "config.json").read_text())
    skip = {"transformers_version", *ignore}
    keys = (set(mine) | set(reference)) - skip
    return [f"{key}: {mine.get(key)!r} vs {reference.get(key)!r}" for key in sorted(keys)
            if mine.get(key) != reference.get(key)]


def tokenizer_differences(ours: Path, theirs: Path) -> list[str]:
    """What the two folders' tokenizers do differently: vocabulary, added tokens, special tokens, chat template."""
    from transformers import AutoTokenizer

    mine, reference = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    problems = []
    if mine.get_vocab() != reference.get_vocab():
        problems.append(f"vocabulary: {len(mine.get_vocab())} vs {len(reference.get_vocab())} tokens")
    added = {i: (t.content, t.special) for i, t in mine.added_tokens_decoder.items()}
    added_reference = {i: (t.content, t.special) for i, t in reference.added_tokens_decoder.items()}
    if added != added_reference:
        problems.append(f"added tokens {added} vs {added_reference}")
    if mine.special_tokens_map != reference.special_tokens_map:
        problems.append(f"special tokens {mine.special_tokens_map} vs {reference.special_tokens_map}")
    if (mine.chat_template or None) != (reference.chat_template or None):
        problems.append("chat templates differ")
    sample = "The capital of France is Paris. <|im_start|>user hi<|im_end|>"
    if mine(sample)["input_ids"] != reference(sample)["input_ids"]:
        problems.append("the same text encodes differently")
    return problems
