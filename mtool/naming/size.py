"""The Size part of a name: a parameter count written with two significant digits.

``size_label(8_030_261_248) == "8.0B"``, ``size_label(494_032_768) == "494M"``; a mixture of experts is
written ``<experts>x<size of one expert's model>`` (``8x7.2B`` for Mixtral-8x7B: the shared weights plus
one expert's). The rounding is llama.cpp's (``gguf.size_label``), so the GGUF converter and mtool agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SIZE_PATTERN = re.compile(r"(?:(?P<experts>[1-9][0-9]*)x)?(?P<value>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMBT])")
_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}

# config.json keys that hold the number of experts of a mixture (Mixtral/Phi-MoE, Qwen-MoE/OLMoE, DeepSeek)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ParameterCount:
    """A model's parameters: ``total``, of which ``expert`` belong to the ``experts`` experts of a mixture."""

    total: int
    expert: int = 0
    experts: int = 0

    @property
    def per_expert_model(self) -> float:
        """Shared parameters plus one expert's: ``total - expert + expert / experts``."""
        if self.experts <= 0:
            return float(self.total)
        return self.total - self.expert + self.expert / self.experts

    @property
    def label(self) -> str:
        return size_label(self)


def rounded_count(count: float) -> str:
    """``count`` in K/M/B/T with at least two significant digits: ``fix = max(2 - digits(round(x)), 0)``
    decimals, where x is the count in its unit (8.03e9 -> "8.0B", 72.7e9 -> "73B", 405e9 -> "405B")."""
    count = abs(count)
    unit = "K"
    for name in ("T", "B", "M"):
        if count >= _UNITS[name]:
            unit = name
            break
    scaled = count / _UNITS[unit]
    decimals = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{decimals}f}{unit}"


def size_label(count: ParameterCount | int) -> str:
    """The Size part for a parameter count: ``8.0B``, ``494M``, ``8x7.2B`` for a mixture."""
    if isinstance(count, int):
        count = ParameterCount(total=count)
    if count.experts > 0:
        return f"{count.experts}x{rounded_count(count.per_expert_model)}"
    return rounded_count(count.total)


@dataclass(frozen=True)
class SizeParts:
    experts: int
    value: float
    unit: str
    decimals: int

    @property
    def count(self) -> float:
        return self.value * _UNITS[self.unit]


def parse_size(text: str) -> SizeParts | None:
    """``"8x7B"`` -> SizeParts(8, 7.0, "B", 0); None when ``text`` is not a size."""
    match = SIZE_PATTERN.fullmatch(text)
    if not match:
        return None
    value, experts = match["value"], match["experts"] or "0"
    if len(experts) > 9 or len(value) > 30:  # not a parameter count anyone writes (and beyond a float's range)
        return None
    decimals = len(value.split(".")[1]) if "." in value else 0
    return SizeParts(int(experts), float(value), match["unit"], decimals)


def size_deviation(text: str, count: ParameterCount) -> float | None:
    """How far the size ``text`` is from the computed count, relative to the count; 0.0 when ``text``
    rounds the count at its own precision (``7B`` for 7.24e9, ``70B`` for 70.6e9), None when ``text``
    is not a size or names another number of experts.

    The precision of a label is its last significant digit: ``7.2B`` -> 0.1B, ``70B`` -> 10B (a trailing
    zero of an integer is not significant), ``405B`` -> 1B.
    """
    parts = parse_size(text)
    if parts is None or parts.experts != max(count.experts, 0):
        return None
    actual = count.per_expert_model
    if actual <= 0:
        return None
    if parts.decimals:
        step = 10.0 ** -parts.decimals
    else:
        integer = str(int(parts.value))
        step = 10.0 ** (len(integer) - len(integer.rstrip("0"))) if integer != "0" else 1.0
    step *= _UNITS[parts.unit]
    if abs(actual - parts.count) <= step / 2 * (1 + 1e-9):
        return 0.0
    return abs(parts.count - actual) / actual


def expert_count(config: dict | None) -> int:
    """The number of experts a config.json declares (0 for a dense model)."""
    if not config:
        return 0
    for source in (config, config.get("text_config") or {}):
        for key in EXPERT_COUNT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 1:
                return value
    return 0


def is_expert_tensor(name: str) -> bool:
    """A tensor of one routed expert (``...experts.3.w1.weight``) or of all of them stacked
    (``...experts.gate_up_proj``); a shared expert (``shared_expert``) is not."""
    return ".experts." in name


def count_parameters(folder: str | Path, config: dict | None = None) -> ParameterCount:
    """Count the parameters in a model folder's weight headers (nothing is loaded), separating the experts
    of a mixture (``config`` gives their number; read from ``folder/config.json`` when not given)."""
    from mtool.io.reading import open_checkpoint

    checkpoint = open_checkpoint(folder)
    if config is None:
        config = checkpoint.read_json("config.json")
    experts = expert_count(config)
    total = 0
    expert = 0
    for name, info in checkpoint.tensors.items():
        total += info.numel
        if experts and is_expert_tensor(name):
            expert += info.numel
    return ParameterCount(total=total, expert=expert if experts else 0, experts=experts if expert else 0)
