"""What a merge method is: its parameters, what inputs it accepts, and the one-tensor task it computes.

A method is a pure function ``MergeTask -> Tensor`` plus a declaration:

* ``parameters``: each :class:`ParameterSpec` has a mergekit name (``weight``, ``density``, ``t``...), a
  default (``REQUIRED`` when it has none), a valid range, and a :class:`Scope`:
  ``SHARED`` (one value for the tensor: ``t``, ``normalize``, ``lambda``), ``INPUT`` (one value per input
  model, base included: linear's ``weight``) or ``NON_BASE`` (one per input other than the base: TIES'
  ``weight`` and ``density``).
* ``base``: whether the method needs a base model (``REQUIRED``), can use one (``OPTIONAL``) or treats every
  input alike (``IGNORED``).
* input counts: how many models it takes, in all and besides the base.

The executor resolves parameters for every output tensor (gradients, filters), reads the input tensors,
casts them to the compute dtype and calls ``method.merge(task)``.
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union

from mtool.errors import ComputeError, ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

ParameterValue = Union[float, int, bool, None]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


class Scope(enum.Enum):
    SHARED = "shared"  # one value per output tensor
    INPUT = "input"  # one value per input model, the base included
    NON_BASE = "non_base"  # one value per input model other than the base


class BasePolicy(enum.Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    IGNORED = "ignored"  # the base, if listed among the models, is an input like any other


@dataclass(frozen=True)
class ParameterSpec:
    """A method parameter as spelled in mergekit recipes."""

    name: str
    kind: type  # float, int or bool
    scope: Scope
    default: ParameterValue | _Required = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: object, *, where: str) -> ParameterValue:
        """Coerce ``value`` to the parameter's kind and check its range (ConfigError naming ``where``)."""
        if value is None and self.default is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ConfigError(f"parameter {self.name!r} must be true or false, got {value!r}", where=where)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"parameter {self.name!r} must be a number, got {value!r}", where=where)
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"parameter {self.name!r} must be a number, got {value!r}", where=where) from None
        if number != number:
            raise ConfigError(f"parameter {self.name!r} is NaN", where=where)
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            low = "-inf" if self.minimum is None else f"{self.minimum:g}"
            high = "inf" if self.maximum is None else f"{self.maximum:g}"
            raise ConfigError(f"parameter {self.name!r} = {number:g} is outside [{low}, {high}]", where=where)
        if self.kind is int:
            if number != int(number):
                raise ConfigError(f"parameter {self.name!r} must be a whole number, got {value!r}", where=where)
            return int(number)
        return number


@dataclass(frozen=True)
class MergeTask:
    """Everything a method needs to produce one output tensor.

    ``inputs`` holds one tensor per input model in recipe order (the base included when the method uses a
    base; ``base_index`` points at it), already in the compute dtype. ``model_params`` is parallel to
    ``inputs``: the resolved per-model parameters (empty for the base when a parameter is ``NON_BASE``).
    ``generator`` is this tensor's own random generator (seeded from the seed and the tensor's name), given
    to random methods only. ``seed`` (the same per-tensor seed) and ``offset`` (where this task's entries
    start in the flattened tensor) let a method draw randomness that depends on the entries' positions only,
    so a tensor merged in chunks gets the same draws as merged whole (see :func:`position_keep_mask`).
    """

    name: str
    inputs: list["torch.Tensor"]
    model_params: list[dict[str, ParameterValue]]
    params: dict[str, ParameterValue]
    base_index: int | None = None
    generator: "torch.Generator | None" = None
    seed: int | None = None
    offset: int = 0

    @property
    def base(self) -> "torch.Tensor":
        if self.base_index is None:
            raise ComputeError("this method needs a base model", where=self.name)
        return self.inputs[self.base_index]

    def non_base(self) -> list[tuple["torch.Tensor", dict[str, ParameterValue]]]:
        """(tensor, parameters) of every input other than the base, in recipe order."""
        return [(t, p) for i, (t, p) in enumerate(zip(self.inputs, self.model_params)) if i != self.base_index]


RANDOM_BLOCK = 1 << 16  # entries drawn from one generator: randomness is fixed per block of positions


def hashed_seed(*parts: object) -> int:
    """A 64-bit seed named by ``parts``: the first 8 bytes (little-endian) of sha256 of ``"p1:p2:..."``."""
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def position_keep_mask(seed: int, member: int, offset: int, count: int, density: float) -> "torch.Tensor":
    """Bernoulli(``density``) keep masks: 1 (uint8) where a position's uniform draw ``u`` is below ``density``
    (rounded to float32), for the flattened positions ``offset .. offset + count`` of one input.

    Each block of ``RANDOM_BLOCK`` positions has its own generator seeded from (seed, member, block), so
    the draw of a position does not depend on how a tensor is split into chunks, nor on the device. The
    generator is numpy's PCG64 (on the CPU, whatever the device). A position's draw is numpy's float32 uniform
    ``u = (x >> 8) / 2^24`` of its 32-bit output ``x`` (the low, then the high half of each 64-bit output);
    ``u < d`` exactly when ``x < 256 * ceil(d * 2^24)``, which is what is compared, on the raw outputs.
    """
    import numpy as np
    import torch

    limit = 256 * math.ceil(float(np.float32(density)) * 2**24)
    out = np.empty(count, dtype=np.bool_)
    if limit <= 0 or limit >= 2**32:
        out.fill(limit > 0)
        return torch.from_numpy(out.view(np.uint8))
    position = offset
    while position < offset + count:
        block = position // RANDOM_BLOCK
        start = position - block * RANDOM_BLOCK
        take = min(RANDOM_BLOCK - start, offset + count - position)
        generator = np.random.PCG64(hashed_seed(seed, member, block))
        generator.advance(start // 2)
        skip = start % 2  # an odd start begins with the high half of a 64-bit output
        draws = _low_then_high_halves(generator.random_raw((skip + take + 1) // 2))[skip:skip + take]
        np.less(draws, limit, out=out[position - offset:position - offset + take])
        position += take
    return torch.from_numpy(out.view(np.uint8))


def _low_then_high_halves(outputs: "np.ndarray") -> "np.ndarray":
    """The 32-bit draws of 64-bit generator outputs, in the generator's order: low half, then high half."""
    import numpy as np

    if sys.byteorder == "little":
        return outputs.view(np.uint32)
    return np.stack([outputs & 0xFFFFFFFF, outputs >> 32], axis=1).astype(np.uint32).reshape(-1)


class ElementSource(Protocol):
    """An input tensor that hands out slices of its flattened elements (in memory, or read from disk)."""

    def numel(self) -> int: ...

    def elements(self, start: int, count: int) -> "torch.Tensor": ...


@dataclass(frozen=True)
class InMemory:
    """An :class:`ElementSource` over a tensor already in memory."""

    tensor: "torch.Tensor"

    def numel(self) -> int:
        return self.tensor.numel()

    def elements(self, start: int, count: int) -> "torch.Tensor":
        return self.tensor.reshape(-1)[start:start + count]


@dataclass(frozen=True)
class ChunkedTensor:
    """One output tensor's inputs, kept in their storage dtype (or on disk), handed out in chunks of the
    flattened tensor.

    :meth:`chunk` takes one slice of every input, rounds it to ``read_dtype`` when given, upcasts it to the
    compute dtype (on ``device``) and wraps it in a :class:`MergeTask` whose ``offset`` says where it starts.
    """

    name: str
    inputs: list[ElementSource]
    model_params: list[dict[str, ParameterValue]]
    params: dict[str, ParameterValue]
    base_index: int | None
    compute_dtype: "torch.dtype"
    chunk_size: int
    seed: int | None = None
    device: str = "cpu"
    read_dtype: "torch.dtype | None" = None

    @property
    def numel(self) -> int:
        return self.inputs[0].numel()

    def starts(self) -> range:
        return range(0, self.numel, self.chunk_size)

    def piece(self, index: int, start: int) -> "torch.Tensor":
        """The chunk starting at ``start`` of input ``index`` alone, in the compute dtype (possibly a view of an
        in-memory input: never modify it in place)."""
        piece = self.inputs[index].elements(start, min(self.chunk_size, self.numel - start))
        if self.read_dtype is not None and piece.dtype != self.read_dtype:
            piece = piece.to(self.read_dtype)
        return piece.to(device=self.device, dtype=self.compute_dtype)

    def chunk(self, start: int) -> MergeTask:
        pieces = [self.piece(index, start) for index in range(len(self.inputs))]
        return MergeTask(name=self.name, inputs=pieces, model_params=self.model_params, params=self.params,
                         base_index=self.base_index, seed=self.seed, offset=start)


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method: its declaration and the function that computes one tensor."""

    name: str
    function: Callable[[MergeTask], "torch.Tensor"]
    parameters: tuple[ParameterSpec, ...] = ()
    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    elementwise: bool = False  # each output entry depends only on the same entry of the inputs
    # Methods that need a few whole-tensor quantities and are otherwise element-wise (SLERP: norms and a
    # dot product; TIES: each model's magnitude threshold) run in chunks too: ``prepare`` computes those
    # quantities from a ChunkedTensor (streaming over its chunks), ``finish`` maps each chunk given them.
    # The result equals ``function``'s up to floating-point summation order.
    prepare: Callable[[ChunkedTensor], object] | None = None
    finish: Callable[[MergeTask, object], "torch.Tensor"] | None = None
    description: str = ""
    reference: str = ""
    extra_checks: tuple[Callable[[dict[str, ParameterValue], list[dict[str, ParameterValue]], str], None], ...] = \
        field(default=())

    def parameter(self, name: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.name == name), None)

    def check_inputs(self, count: int, has_base: bool, *, where: str) -> None:
        """Refuse a number of models (or a missing base) the method cannot merge."""
        if self.base is BasePolicy.REQUIRED and not has_base:
            raise ConfigError(f"merge method {self.name!r} needs a base_model", where=where,
                              fix="add `base_model:` to the recipe")
        non_base = count - int(has_base and self.base is not BasePolicy.IGNORED)
        for label, value, low, high in (("models", count, self.min_inputs, self.max_inputs),
                                        ("models besides the base", non_base, self.min_non_base, self.max_non_base)):
            if value < low or (high is not None and value > high):
                expected = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
                raise ConfigError(f"merge method {self.name!r} takes {expected} {label}, the recipe gives {value}",
                                  where=where)

    def merge(self, task: MergeTask) -> "torch.Tensor":
        shapes = {tuple(t.shape) for t in task.inputs}
        if len(shapes) > 1:
            raise ComputeError(f"input tensors have different shapes {sorted(shapes)}", where=task.name)
        return self.function(task)
