"""Checkpoints in the layout transformers 5 builds its models in, as mergekit 0.1.5 merges them.

transformers 5 keeps some architectures' weights in memory in another layout than their checkpoints: a mixture
of experts stacks its experts (Mixtral's ``block_sparse_moe.experts.{e}.w1/w3.weight`` become
``mlp.experts.gate_up_proj`` of shape ``[E, 2I, H]``, ``w2`` becomes ``mlp.experts.down_proj``; Qwen-MoE and
DeepSeek the same from ``gate_proj``/``up_proj``/``down_proj``). It publishes these conversions
(``transformers.conversion_mapping``), and mergekit merges, and writes, the converted tensors. mtool reads a
checkpoint through the same conversions so that a merge sees, computes on and writes the same tensors: stacks of
experts (then concatenated along dimension 1 when two weights share a tensor) and the renamings that come with
them. Only checkpoints that store experts one by one are converted (a conversion made of other operations, or of
renamings alone, such as a vision-language model's, is not applied: the checkpoint's own names are merged, which
transformers loads as they are).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mtool.io.reading import Checkpoint


@dataclass(frozen=True)
class Stacked:
    """A tensor made of several checkpoint tensors: per part, its experts stacked along dimension 0; the parts
    concatenated along dimension 1."""

    parts: tuple[tuple[str, ...], ...]

    def shape(self, checkpoint: "Checkpoint") -> tuple[int, ...]:
        first = tuple(checkpoint.info(self.parts[0][0]).shape)
        width = sum(checkpoint.info(part[0]).shape[0] for part in self.parts)
        return (len(self.parts[0]), width, *first[1:])

    def numel(self, checkpoint: "Checkpoint") -> int:
        return math.prod(self.shape(checkpoint))

    def read(self, checkpoint: "Checkpoint") -> "torch.Tensor":
        import torch

        stacks = [torch.stack([checkpoint.read(name) for name in part]) for part in self.parts]
        return stacks[0] if len(stacks) == 1 else torch.cat(stacks, dim=1)


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"([0-9]+)", name))


_ONE_EXPERT = re.compile(r"\.experts\.\d+\.")


def converted_names(model_type: str | None, names: list[str]) -> dict[str, str | Stacked]:
    """The model-layout name of every tensor, mapped to the checkpoint tensor (or the stack) it comes from."""
    mapping = {name: name for name in names}
    if not model_type or not any(_ONE_EXPERT.search(name) for name in names):
        return mapping  # nothing to stack: transformers (and its conversion tables) need not be imported
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightRenaming
    except ImportError:
        return mapping
    transforms = get_checkpoint_conversion_mapping(model_type) or []
    if all(isinstance(transform, WeightRenaming) for transform in transforms):
        return mapping
    for transform in transforms:
        if isinstance(transform, WeightRenaming):
            renamed = {}
            for name, source in mapping.items():
                target, matched = transform.rename_source_key(name)
                renamed[target if matched is not None else name] = source
            mapping = renamed
            continue
        operations = [type(op) for op in getattr(transform, "operations", [])]
        if not operations or operations[0] is not MergeModulelist or any(op is not Concatenate
                                                                         for op in operations[1:]):
            continue
        if getattr(transform.operations[0], "dim", 0) != 0 or \
                any(getattr(op, "dim", 1) != 1 for op in transform.operations[1:]):
            continue
        groups: dict[str, dict[str, list[str]]] = {}
        for name in sorted(mapping, key=_natural):
            target, pattern = transform.rename_source_key(name)
            if pattern is not None and isinstance(mapping[name], str):
                groups.setdefault(target, {}).setdefault(pattern, []).append(name)
        for target, by_pattern in groups.items():
            if set(by_pattern) != set(transform.source_patterns):
                continue  # an incomplete group stays as it is
            parts = tuple(tuple(mapping[n] for n in by_pattern[p]) for p in transform.source_patterns)
            if len({len(part) for part in parts}) != 1:
                continue
            for names_in_part in by_pattern.values():
                for name in names_in_part:
                    del mapping[name]
            mapping[target] = Stacked(parts)
    return mapping
