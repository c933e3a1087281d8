"""The files the demo writes for its commands: training configs, merge recipes, the search space and the
evaluation specs, each what a user would write by hand."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from mtool.demo.pipeline import DemoSettings

# The search space of the demo's searched merge: TIES parameters (each fine-tune's weight and density, the scale of
# the merged task vector, and whether the kept deltas are averaged or added); it starts from the TIES row's recipe.
SEARCH_SPACE = {
    "weight": (0.5, 1.5),
    "density": (0.3, 1.0),
    "lambda": (0.8, 1.6),
    "normalize": (True, False),
}


def write_train_config(path: Path, base: Path, out: Path, data: list[Path], checkpoints: Path,
                        settings: "DemoSettings") -> Path:
    config = {
        "base": str(base), "out": str(out), "seed": settings.seed,
        "model": {"quantization": "nf4", "gradient_checkpointing": False},
        "lora": {"rank": settings.adapter_rank, "alpha": settings.adapter_rank, "target_modules": "all-linear"},
        "data": {"path": [str(p) for p in data], "format": "chat"},
        "training": {"max_steps": settings.adapter_steps, "micro_batch_size": settings.batch_size,
                     "lr": settings.adapter_lr, "schedule": "constant", "warmup_steps": 0},
        "checkpoints": {"every": 0, "dir": str(checkpoints)},  # metrics.jsonl; a checkpoint only on Ctrl-C
    }
    header = "# QLoRA (4-bit NF4 base) on one skill, with the base's general facts replayed against forgetting.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def write_merge_recipe(path: Path, method: str, base: Path, fine_tunes: dict[str, Path],
                        settings: "DemoSettings") -> Path:
    """A mergekit recipe merging the fine-tunes with ``method``."""
    models = list(fine_tunes.values())
    recipe: dict = {"merge_method": method}
    if method == "linear":  # the weighted mean of the fine-tunes
        recipe["models"] = [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]
    elif method == "slerp":  # halfway along the arc between the two fine-tunes
        recipe["base_model"] = str(models[0])
        recipe["models"] = [{"model": str(m)} for m in models]
        recipe["parameters"] = {"t": 0.5}
    else:  # ties, dare_ties: task vectors against the base, trimmed (or dropped) to `density`
        recipe["base_model"] = str(base)
        recipe["models"] = [{"model": str(m), "parameters": {"weight": 1.0, "density": settings.density}}
                            for m in models]
    recipe["dtype"] = "float32"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def write_search_space(path: Path, models: int) -> Path:
    """The space ``mtool merge --search`` explores: :data:`SEARCH_SPACE` for each of ``models`` fine-tunes."""
    dimensions = []
    for name in ("weight", "density"):
        low, high = SEARCH_SPACE[name]
        dimensions += [{"name": name, "model": index, "range": [low, high]} for index in range(models)]
    dimensions.append({"name": "lambda", "range": list(SEARCH_SPACE["lambda"])})
    dimensions.append({"name": "normalize", "choices": list(SEARCH_SPACE["normalize"])})
    header = "# TIES parameters searched for the demo's searched merge (models by their index in the recipe).\n"
    path.write_text(header + yaml.safe_dump({"parameters": dimensions}, sort_keys=False), encoding="utf-8")
    return path


def write_eval_spec(path: Path, files: dict[str, Path], note: str) -> Path:
    """An evaluation spec: exact match of greedy answers on each task's questions (equal weights)."""
    spec = {"tasks": [{"name": name, "kind": "exact_match", "data": str(file), "max_new_tokens": 6}
                      for name, file in files.items()],
            "batch_size": 64}
    path.write_text(f"# {note}\n" + yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path
