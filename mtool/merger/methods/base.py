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
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union

from mtool.errors import ComputeError, ConfigError, shown

if TYPE_CHECKING:
    import torch

ParameterValue = Union[float, int, bool, None]
PARAMETER_FIX = "see the method's parameters and their ranges in docs/merge.md"


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
    """A method parameter as spelled in mergekit recipes.

    Values are read as mergekit reads them (pydantic's lax conversion to ``kind``: ``"1e-3"`` is 0.001, ``5.0``
    a valid int, ``"yes"`` true); ``optional`` also allows None. ``minimum`` / ``maximum`` are the range where the
    parameter means something: mergekit accepts values outside it and so does mtool, with a warning (an error
    with ``--strict``)."""

    name: str
    kind: type  # float, int or bool
    scope: Scope
    default: ParameterValue | _Required = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""
    optional: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: object, *, where: str) -> ParameterValue:
        """``value`` as the parameter's kind (ConfigError naming ``where`` when it is not one)."""
        if value is None and self.optional:
            return None
        try:
            result = _adapter(self.kind).validate_python(value)
        except ValueError:
            kind = {bool: "true or false", int: "a whole number"}.get(self.kind, "a number")
            raise ConfigError(f"parameter {self.name!r} must be {kind}, got {shown(value, 60)}", where=where,
                              fix=PARAMETER_FIX) from None
        if isinstance(result, float) and result != result:
            raise ConfigError(f"parameter {self.name!r} is NaN", where=where, fix=PARAMETER_FIX)
        return result

    def outside_range(self, value: ParameterValue) -> str | None:
        """A description of the meaningful range when ``value`` lies outside it, else None."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            low = "-inf" if self.minimum is None else f"{self.minimum:g}"
            high = "inf" if self.maximum is None else f"{self.maximum:g}"
            return f"[{low}, {high}]"
        return None


@functools.cache
def _adapter(kind: type):
    from pydantic import TypeAdapter

    return TypeAdapter(kind)


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


class Chunk(Protocol):
    """One chunk of an output tensor, as the executor hands it to a method: ``offset`` is its first element in
    the flattened tensor."""

    offset: int

    def input(self, index: int) -> "torch.Tensor":
        """Input ``index``'s elements of this chunk, flat, in the compute dtype (read when asked for; possibly a
        view of an input in memory: never modify it in place)."""
        ...

    def task(self) -> MergeTask:
        """Every input's elements of this chunk as a :class:`MergeTask` (with this chunk's ``offset``)."""
        ...


class TensorChunks(Protocol):
    """One output tensor as a method's statistics pass sees it: its parameters, and its chunks in order. How large
    the chunks are, and where their elements come from, is the executor's business."""

    name: str
    model_params: list[dict[str, ParameterValue]]
    params: dict[str, ParameterValue]
    base_index: int | None
    compute_dtype: "torch.dtype"
    seed: int | None
    device: str

    @property
    def numel(self) -> int: ...

    @property
    def input_count(self) -> int: ...

    def chunks(self) -> Iterator[Chunk]: ...


@dataclass(frozen=True)
class _WholeChunk:
    whole: "WholeTensor"
    offset: int = 0

    def input(self, index: int) -> "torch.Tensor":
        return self.whole.task.inputs[index].reshape(-1)

    def task(self) -> MergeTask:
        task = self.whole.task
        return MergeTask(name=task.name, inputs=[t.reshape(-1) for t in task.inputs], model_params=task.model_params,
                         params=task.params, base_index=task.base_index, seed=task.seed, offset=0)


@dataclass(frozen=True)
class WholeTensor:
    """A :class:`TensorChunks` of one chunk: a task whose inputs are whole tensors already in memory."""

    task: MergeTask

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def model_params(self) -> list[dict[str, ParameterValue]]:
        return self.task.model_params

    @property
    def params(self) -> dict[str, ParameterValue]:
        return self.task.params

    @property
    def base_index(self) -> int | None:
        return self.task.base_index

    @property
    def seed(self) -> int | None:
        return self.task.seed

    @property
    def compute_dtype(self) -> "torch.dtype":
        return self.task.inputs[0].dtype

    @property
    def device(self) -> str:
        return str(self.task.inputs[0].device)

    @property
    def numel(self) -> int:
        return self.task.inputs[0].numel()

    @property
    def input_count(self) -> int:
        return len(self.task.inputs)

    def chunks(self) -> Iterator[Chunk]:
        yield _WholeChunk(self)


def no_scratch(numel: int, inputs: int, compute_itemsize: int) -> int:
    """Scratch memory of a method whose statistics pass keeps nothing of the tensor's size."""
    return 0


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method: its declaration and how it computes one output tensor.

    How the executor may run it, from the cheapest:

    * ``elementwise``: each output entry depends only on the same entry of the inputs, so ``function`` maps any
      chunk of the tensor (linear, task arithmetic's relatives with no sparsification, NearSwap, passthrough);
    * ``prepare`` + ``finish``: a statistics pass over the tensor's chunks (``prepare``: SLERP's norms and dot
      product, TIES' magnitude thresholds, DARE's keep masks and rescale factors) whose result lets ``finish``
      map each chunk; ``prepare_scratch(numel, inputs, compute itemsize)`` is the memory that pass holds beyond
      the chunks (for the executor's memory estimate). Such a method needs no ``function``: :meth:`merge` of a
      whole tensor runs the same two steps on one chunk;
    * otherwise ``function`` sees whole tensors.

    Precision follows mergekit 0.1.5: the inputs arrive in the tensor's working dtype (the recipe's ``dtype``,
    else the inputs' common dtype) and the method computes in it, step by step, as mergekit does; methods marked
    ``internal_float32`` (linear, SLERP) get float32 inputs instead (float64 stays float64) and their result is
    rounded to the working dtype. With ``mtool: {math: float32}`` every method gets float32 inputs.
    """

    name: str
    function: Callable[[MergeTask], "torch.Tensor"] | None = None
    parameters: tuple[ParameterSpec, ...] = ()
    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    elementwise: bool = False
    internal_float32: bool = False  # computes in float32 (float64 for float64 inputs) whatever the inputs' dtype
    result_float32: bool = False  # its result is float32 for 16-bit inputs (mergekit writes it so)
    prepare: Callable[[TensorChunks], object] | None = None
    finish: Callable[[MergeTask, object], "torch.Tensor"] | None = None
    prepare_scratch: Callable[[int, int, int], int] = no_scratch
    description: str = ""
    reference: str = ""
    extra_checks: tuple[Callable[[dict[str, ParameterValue], list[dict[str, ParameterValue]], str], None], ...] = \
        field(default=())

    @property
    def streams(self) -> bool:
        """Whether the executor may run the method chunk by chunk."""
        return self.elementwise or self.finish is not None

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
                expected = (f"exactly {low}" if low == high
                            else (f"at least {low}" if high is None else f"{low} to {high}"))
                raise ConfigError(f"merge method {self.name!r} takes {expected} {label}, the recipe gives {value}",
                                  where=where)

    def map_chunk(self, task: MergeTask, prepared: object) -> "torch.Tensor":
        """One chunk of a streamed tensor, given what ``prepare`` computed (None without a statistics pass)."""
        return self.finish(task, prepared) if self.finish is not None else self.function(task)

    def merge(self, task: MergeTask) -> "torch.Tensor":
        """The whole output tensor from whole input tensors."""
        shapes = {tuple(t.shape) for t in task.inputs}
        if len(shapes) > 1:
            raise ComputeError(f"input tensors have different shapes {sorted(shapes)}", where=task.name)
        if self.function is not None:
            return self.function(task)
        whole = WholeTensor(task)
        prepared = self.prepare(whole) if self.prepare is not None else None
        return self.finish(next(whole.chunks()).task(), prepared).reshape(task.inputs[0].shape)
