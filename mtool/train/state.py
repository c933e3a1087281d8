"""Training checkpoints: everything a resumed run needs to continue as if it had never stopped.

A checkpoint is a folder ``<checkpoint dir>/step-000200`` written atomically (built beside it and renamed into
place, so a kill while writing leaves the previous checkpoint as the newest). It holds:

- ``adapter_model.safetensors`` + ``adapter_config.json``: the trainable weights as a PEFT adapter (usable
  for inference as it is);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state keyed by parameter name
  (``torch.distributed.checkpoint.state_dict``'s full form), its tensors in safetensors and the rest (step
  counts, hyper-parameters) in JSON: no pickle is ever written or read;
- ``trainer-state.json``: the step (which fixes the learning rate, the data position and the random state, all
  functions of the step), the epoch, token counters, elapsed time and the fp16 loss-scaler state;
- ``train-config.yaml``: the config, compared with the resuming run's.

The adapter and the optimizer state are the full ones whatever the run's layout (an FSDP run gathers them from
its shards first), so a checkpoint resumes in one process, under DDP or under FSDP (:mod:`mtool.train.fsdp`).
Checkpoints of earlier versions, whose optimizer state is keyed by position, still resume in one process.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.errors import CheckpointError

if TYPE_CHECKING:
    import torch

STEP_FOLDER = re.compile(r"^step-(\d+)$")
STATE_FILENAME = "trainer-state.json"


@dataclass
class Progress:
    """Where a run stands after ``step`` optimizer steps."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0  # real tokens processed (all processes)
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    world_size: int = 1
    scaler: dict[str, Any] | None = field(default=None)  # torch GradScaler state (fp16 only)


def step_folder(directory: Path, step: int) -> Path:
    return directory / f"step-{step:06d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(step, folder)``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_FOLDER.match(child.name)
        if match and (child / STATE_FILENAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; also remove half-written ones a killed run left behind."""
    for _, folder in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in directory.glob(".step-*.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Optimizer state <-> safetensors + JSON


def flatten_state(state: dict[str, Any]) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors keyed by their path (``state/3/exp_avg``) and a JSON tree
    of everything else, with each tensor's place marked ``{"__tensor__": path}``."""
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[key, walk(item, f"{path}/{key}")] for key, item in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(item, f"{path}/{i}") for i, item in enumerate(value)]
        return value

    return tensors, walk(state, "")


def unflatten_state(tensors: dict[str, "torch.Tensor"], tree: Any) -> Any:
    """The inverse of :func:`flatten_state` (dict keys keep their JSON types: ints stay ints)."""
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {key: unflatten_state(tensors, item) for key, item in tree["__dict__"]}
    if isinstance(tree, list):
        return [unflatten_state(tensors, item) for item in tree]
    return tree


def _restore_tuples(saved_groups: list[dict[str, Any]], current_groups: list[dict[str, Any]]) -> None:
    """JSON turns tuples (``betas``) into lists; give them back the type the optimizer uses."""
    for saved, current in zip(saved_groups, current_groups):
        for key, value in current.items():
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])


# ---------------------------------------------------------------------------------------------------
# Whole checkpoints


def save_checkpoint(folder: Path, *, model: Any, optimizer_state: dict[str, Any], progress: Progress,
                    config_yaml: str, trainable: dict[str, "torch.Tensor"] | None = None) -> Path:
    """Write a checkpoint folder atomically (see the module docstring). ``model`` is the PEFT model,
    ``optimizer_state`` the full state by parameter names (:func:`mtool.train.fsdp.gather_optimizer_state`) and
    ``trainable`` the gathered trainable parameters of a sharded model (None: the model's own)."""
    from mtool.io.folders import atomic_output_dir
    from mtool.io.writing import save_tensors

    with atomic_output_dir(folder, force=True) as staging:
        if trainable is None:
            model.save_pretrained(staging)
        else:
            model.save_pretrained(staging, state_dict=trainable)
        tensors, tree = flatten_state(optimizer_state)
        save_tensors(staging, tensors, file_stem="optimizer")
        (staging / "optimizer.json").write_text(json.dumps(tree), encoding="utf-8")
        (staging / "train-config.yaml").write_text(config_yaml, encoding="utf-8")
        (staging / STATE_FILENAME).write_text(json.dumps(asdict(progress), indent=2), encoding="utf-8")
    return folder


def read_progress(folder: Path) -> Progress:
    try:
        return Progress(**json.loads((folder / STATE_FILENAME).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"unreadable training state: {error}", where=str(folder),
                              fix="resume from an earlier checkpoint (delete this one) or start over with --force") \
            from None


def load_checkpoint(folder: Path, *, model: Any, optimizer: "torch.optim.Optimizer") -> Progress:
    """Restore the trainable weights and the optimizer from ``folder`` into ``model`` (the PEFT model, sharded
    or not, whatever layout wrote the checkpoint); return its :class:`Progress`."""
    from safetensors.torch import load_file

    from mtool.train.fsdp import adapter_key_names, is_sharded, load_optimizer_state, load_trainable_state

    progress = read_progress(folder)
    try:
        weights = load_file(str(folder / "adapter_model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors")) if (folder / "optimizer.safetensors").is_file() \
            else {}
        tree = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"incomplete checkpoint: {error}", where=str(folder),
                              fix="delete it to resume from the one before") from None
    names = adapter_key_names(model)
    unexpected = [key for key in weights if key not in names]
    if unexpected:
        raise CheckpointError(f"the checkpoint does not fit the model: unexpected {unexpected[:3]}", where=str(folder))
    load_trainable_state(model, {names[key]: tensor for key, tensor in weights.items()})
    state = unflatten_state(tensors, tree)
    _restore_tuples(state["param_groups"], optimizer.param_groups)
    by_index = all(isinstance(key, int) for key in state["state"])  # written before states were keyed by name
    try:
        if by_index and state["state"]:
            if is_sharded(model):
                raise CheckpointError("this checkpoint's optimizer state is keyed by position (an older mtool) and "
                                      "cannot be sharded", where=str(folder), fix="resume it in one process")
            optimizer.load_state_dict(state)
        else:
            load_optimizer_state(model, optimizer, state)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"the optimizer state does not fit this run: {error}", where=str(folder),
                              fix="resume with the same optimizer and LoRA settings") from None
    return progress
