"""FSDP2: the model sharded across processes, and the full training state that checkpoints hold.

With ``training.parallelism: fsdp`` every decoder layer and then the whole model go through
``torch.distributed.fsdp.fully_shard``: each of ``P`` processes keeps ``1/P`` of every parameter (the frozen base
included: 4-bit weights are stored in the compute dtype, so their bytes shard like any other tensor), of the
LoRA gradients and of the optimizer states. A layer's parameters are gathered just before its forward (and
again for its backward), then freed. Launch it like DDP, with ``torchrun`` or ``accelerate launch``.

Trainable parameters must share one dtype within a layer (float32 LoRA matrices do); frozen ones may differ.
A layer's LoRA tensors are read inside the layer's forward (the lean nodes read them directly), which is where
FSDP has gathered them.

Checkpoints hold the *full* state whatever the run's layout: the trainable parameters by their names in the
model (gathered from the shards) and the optimizer state keyed by the same names
(``torch.distributed.checkpoint.state_dict``). A checkpoint written by an FSDP run therefore resumes in one
process (or under DDP) and the other way round; :func:`load_trainable_state` puts each process's part of the
full tensors in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mtool.train.distributed import Processes


def decoder_layers(model: Any) -> list["torch.nn.Module"]:
    """The repeated decoder layers of a transformers model (its gradient-checkpointing layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def shard_model(model: Any, processes: "Processes") -> Any:
    """Apply FSDP2 to every decoder layer, then to the whole model (the root holds embeddings, final norm and
    head). Returns the same model object (FSDP2 changes its class in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(processes.device.type, (processes.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(*, full: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True)


def gather_trainable_state(model: Any) -> dict[str, "torch.Tensor"]:
    """The full trainable parameters by name, on the CPU (every process must call it under FSDP; only the main
    process receives the tensors then)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full=True))


def gather_optimizer_state(model: Any, optimizer: "torch.optim.Optimizer") -> dict[str, Any]:
    """The optimizer state keyed by parameter names, full and on the CPU (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(full=True))


def adapter_key_names(model: Any) -> dict[str, str]:
    """PEFT adapter-file keys -> the model's parameter names (``q_proj.lora_A.weight`` ->
    ``...q_proj.lora_A.default.weight``), from PEFT's own selection of the model's trainable tensors."""
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    current = get_model_state_dict(model, options=_options(full=False))
    by_identity = {id(tensor): name for name, tensor in current.items()}
    selected = get_peft_model_state_dict(model, state_dict=current)
    return {key: by_identity[id(tensor)] for key, tensor in selected.items() if id(tensor) in by_identity}


def load_trainable_state(model: Any, state: dict[str, "torch.Tensor"]) -> None:
    """Put full tensors (by parameter name) into the model; under FSDP each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=is_sharded(model), strict=False))


def load_optimizer_state(model: Any, optimizer: "torch.optim.Optimizer", state: dict[str, Any]) -> None:
    """Load an optimizer state keyed by parameter names (as :func:`gather_optimizer_state` gives it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=is_sharded(model), strict=False))
