"""The streaming executor: output tensors produced in order, a few ahead, and written straight into place.

Every command that writes a model folder tensor by tensor (``mtool merge``, ``mtool adapters merge``, training's
``--merge``) describes each output tensor as a *job* and gives two functions:

* ``prepare(job)`` runs in worker threads, a few jobs ahead: read the inputs (and, where the work is per tensor,
  compute the result);
* ``produce(job, prepared)`` runs in the calling thread, in job order, and yields the output tensor as
  consecutive parts ``(first flat element, values in the output dtype)``.

Each part goes to a writer thread that puts it straight into its place in the output shards
(:class:`~mtool.io.writing.CheckpointWriter`); written in order, the shards are hashed on the way. Memory is
bounded: at most ``lookahead`` jobs are prepared ahead, holding at most ``lookahead_bytes`` (a larger job goes
alone), and at most ``pending_writes`` parts wait for the writer. Peak memory is a few tensors, never a model.

While it runs, torch computes on one thread (the other cores read, write and hash) and glibc's allocator follows
the command's :class:`~mtool.runtime.AllocatorPolicy`; both are restored when it returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from mtool import ui
from mtool.errors import ComputeError
from mtool.runtime import REUSE_FREED_BUFFERS, AllocatorPolicy, allocator_policy, torch_threads

if TYPE_CHECKING:
    import torch

    from mtool.io.writing import CheckpointWriter

Job = TypeVar("Job")
Prepared = TypeVar("Prepared")


@dataclass(frozen=True)
class StreamLimits:
    """How far ahead the executor works, and with which allocator policy."""

    lookahead: int = 3  # jobs prepared ahead of the one being produced
    lookahead_bytes: int = 128 * 2**20  # ... holding at most this many bytes (a larger job goes alone)
    workers: int = 2  # threads that prepare jobs
    pending_writes: int = 8  # parts queued for the writer thread
    allocator: AllocatorPolicy = REUSE_FREED_BUFFERS


@dataclass(frozen=True)
class Stream(Generic[Job, Prepared]):
    """What a command streams: its jobs in output order, and the functions that make each output tensor.

    ``name(job)`` is the output tensor's name in the writer; ``held_bytes(job)`` what a prepared job holds in
    memory (for the look-ahead budget).
    """

    jobs: Sequence[Job]
    name: Callable[[Job], str]
    prepare: Callable[[Job], Prepared]
    produce: Callable[[Job, Prepared], Iterable[tuple[int, "torch.Tensor"]]]
    held_bytes: Callable[[Job], int]


def stream_tensors(stream: Stream, writer: "CheckpointWriter", *, limits: StreamLimits = StreamLimits(),
                   description: str = "write") -> None:
    """Produce every job of ``stream`` and write it with ``writer`` (see the module docstring).

    Returns once every part is written; the worker and writer threads have finished (or failed) everything they
    were given before it returns or raises, so the caller may close the writer right after.
    """
    import torch

    total = sum(spec.nbytes for spec in writer.specs)
    with torch_threads(1), allocator_policy(limits.allocator), \
            ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="mtool-prepare") as workers, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtool-write") as writer_thread:
        prepared: deque[tuple[object, Future]] = deque()
        upcoming = deque(stream.jobs)
        writes: deque[Future] = deque()

        def prepare_in_worker(job: object) -> object:
            with torch.inference_mode():
                return stream.prepare(job)

        def schedule() -> None:
            """Start preparing the next jobs while they fit the look-ahead budget (one at least)."""
            while upcoming and len(prepared) < limits.lookahead:
                held = sum(stream.held_bytes(job) for job, _ in prepared)
                if prepared and held + stream.held_bytes(upcoming[0]) > limits.lookahead_bytes:
                    return
                job = upcoming.popleft()
                prepared.append((job, workers.submit(prepare_in_worker, job)))

        schedule()
        bar = ui.progress(total=total, desc=description, unit="B", unit_scale=True)
        with torch.inference_mode():
            while prepared:
                job, future = prepared.popleft()
                inputs = future.result()
                schedule()
                name = stream.name(job)
                for start, part in stream.produce(job, inputs):
                    writes.append(writer_thread.submit(writer.write_part, name, start, part))
                    while len(writes) > limits.pending_writes:
                        writes.popleft().result()
                    bar.update(part.numel() * part.element_size())
                del inputs
            while writes:
                writes.popleft().result()
        bar.close()


def require_finite(tensor: "torch.Tensor", what: str, fix: str) -> "torch.Tensor":
    """``tensor`` itself, or ComputeError when it holds NaN or Inf. One reduction first (any NaN or Inf makes the
    sum non-finite, and a finite sum rules both out), the element-wise test only when the sum is not finite."""
    import torch

    if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise ComputeError(f"the merge produced NaN or Inf values in {what}", fix=fix)
    return tensor

