"""A model folder fit to publish: a TIES merge of two fine-tunes of a tiny Llama, every input apache-2.0, made from
relative paths (so its card shows no local path), named ``Llama-123K-AlphaBeta-TIES-v1.0``."""

from __future__ import annotations

import os
from pathlib import Path

NAME = "Llama-123K-AlphaBeta-TIES-v1.0"


def licensed_merge(root: Path) -> Path:
    from mtool.merger.plan import build_plan
    from mtool.merger.recipe import load_recipe
    from mtool.merger.run import MergeOptions, execute
    from mtool.tinymodels import TinySpec, make_tiny_finetune, make_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    make_tiny_model(root / "base", TinySpec(), license="apache-2.0")
    for seed, name in ((1, "Alpha"), (2, "Beta")):
        make_tiny_finetune(root / "base", root / name, seed=seed)
        (root / name / "README.md").write_text("---\nlicense: apache-2.0\n---\n", encoding="utf-8")
    recipe = root / "ties.yaml"
    recipe.write_text("merge_method: ties\nbase_model: base\nmodels:\n"
                      "  - model: Alpha\n    parameters: {weight: 1.0, density: 0.5}\n"
                      "  - model: Beta\n    parameters: {weight: 1.0, density: 0.5}\ndtype: float32\n",
                      encoding="utf-8")
    here = os.getcwd()
    os.chdir(root)  # the recipe names its models by relative path, as a user in that folder would
    try:
        execute(build_plan(load_recipe(recipe)), Path("merged"), MergeOptions())
    finally:
        os.chdir(here)
    return root / "merged"
