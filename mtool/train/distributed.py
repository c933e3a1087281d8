"""Several processes on one or more machines, started by ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; mtool joins the
process group they describe (NCCL on GPUs, gloo on CPU) and either wraps the model in PyTorch's
``DistributedDataParallel`` (``training.parallelism: ddp``: every process holds the whole model) or shards it
with FSDP2 (``fsdp``, :mod:`mtool.train.fsdp`). A single process (no ``WORLD_SIZE``) runs without any of it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run."""

    rank: int
    world_size: int
    local_rank: int
    device: "torch.device"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join_processes() -> Processes:
    """Join the launcher's process group (if any) and pick this process's device."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return Processes(rank, world_size, local_rank, device)


def leave_processes(processes: Processes) -> None:
    import torch

    if processes.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def sum_across(values: list[float], processes: Processes) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64; the values themselves when alone)."""
    if not processes.distributed:
        return list(values)
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def barrier(processes: Processes) -> None:
    if processes.distributed:
        import torch

        torch.distributed.barrier()


def wrap_for_data_parallel(model: Any, processes: Processes, parallelism: str = "ddp") -> Any:
    """``fsdp``: the model sharded (:func:`mtool.train.fsdp.shard_model`). ``ddp``: ``DistributedDataParallel``
    over the trainable parameters only: the frozen (possibly 4-bit) base is loaded identically everywhere, so it
    is neither broadcast at start nor touched by the gradient exchange."""
    if not processes.distributed:
        return model
    if parallelism == "fsdp":
        from mtool.train.fsdp import shard_model

        return shard_model(model, processes)
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [processes.device.index] if processes.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: Any, enabled: bool) -> Iterator[None]:
    """Inside, a DDP or FSDP model does not exchange gradients (for all but the last micro-batch of a step)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: gradients stay unsharded until the last one
        model.set_requires_gradient_sync(enabled)
        yield
    elif enabled or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
