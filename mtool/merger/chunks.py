"""How the merge executor cuts an output tensor into chunks: the inputs stay in their storage dtype (or on disk)
and each chunk of the flattened tensor is read, rounded to the recipe's ``dtype`` and upcast to the compute
dtype only when a method asks for it. :class:`ChunkedTensor` is what a method's statistics pass sees
(:class:`~mtool.merger.methods.base.TensorChunks`); :meth:`ChunkedTensor.task` is what its map sees."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mtool.io.reading import TensorInfo, read_elements
from mtool.merger.methods.base import MergeTask, ParameterValue

if TYPE_CHECKING:
    import torch

CHUNK_ELEMENTS = 1 << 20  # a few such float32 chunks stay in a core's cache


class ElementSource(Protocol):
    """An input tensor that hands out slices of its flattened elements (in memory, or read from disk)."""

    def numel(self) -> int: ...

    def elements(self, start: int, count: int) -> "torch.Tensor": ...


@dataclass(frozen=True)
class InMemory:
    """An :class:`ElementSource` over a tensor already in memory (slices are views)."""

    tensor: "torch.Tensor"

    def numel(self) -> int:
        return self.tensor.numel()

    def elements(self, start: int, count: int) -> "torch.Tensor":
        return self.tensor.reshape(-1)[start:start + count]


@dataclass(frozen=True)
class OnDisk:
    """An :class:`ElementSource` read slice by slice from its file."""

    info: TensorInfo

    def numel(self) -> int:
        return self.info.numel

    def elements(self, start: int, count: int) -> "torch.Tensor":
        return read_elements(self.info, start, count)


@dataclass(frozen=True)
class ChunkedTensor:
    """One output tensor's inputs, handed out in chunks of ``chunk_size`` elements of the flattened tensor."""

    name: str
    inputs: list[ElementSource]
    model_params: list[dict[str, ParameterValue]]
    params: dict[str, ParameterValue]
    base_index: int | None
    compute_dtype: "torch.dtype"
    chunk_size: int = CHUNK_ELEMENTS
    seed: int | None = None
    device: str = "cpu"
    read_dtype: "torch.dtype | None" = None

    @property
    def numel(self) -> int:
        return self.inputs[0].numel()

    @property
    def input_count(self) -> int:
        return len(self.inputs)

    def starts(self) -> range:
        return range(0, self.numel, self.chunk_size)

    def piece(self, index: int, start: int) -> "torch.Tensor":
        """The chunk starting at ``start`` of input ``index`` alone, in the compute dtype (possibly a view of an
        in-memory input: never modify it in place)."""
        piece = self.inputs[index].elements(start, min(self.chunk_size, self.numel - start))
        if self.read_dtype is not None and piece.dtype != self.read_dtype:
            piece = piece.to(self.read_dtype)
        return piece.to(device=self.device, dtype=self.compute_dtype)

    def task(self, start: int) -> MergeTask:
        """Every input's chunk starting at ``start``, as one task."""
        pieces = [self.piece(index, start) for index in range(len(self.inputs))]
        return MergeTask(name=self.name, inputs=pieces, model_params=self.model_params, params=self.params,
                         base_index=self.base_index, seed=self.seed, offset=start)

    def chunks(self) -> Iterator["_Chunk"]:
        for start in self.starts():
            yield _Chunk(self, start)


@dataclass(frozen=True)
class _Chunk:
    """A :class:`~mtool.merger.methods.base.Chunk` of a :class:`ChunkedTensor`: inputs read when asked for."""

    tensor: ChunkedTensor
    offset: int

    def input(self, index: int) -> "torch.Tensor":
        return self.tensor.piece(index, self.offset)

    def task(self) -> MergeTask:
        return self.tensor.task(self.offset)
