"""Every example recipe in recipes/merge/ parses and plans (a dry run) on tiny stand-in models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtool.merger.describe import describe_plan
from mtool.merger.plan import build_plan
from mtool.merger.recipe import parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "merge").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_example_recipe_plans_on_tiny_models(recipe: Path, tiny) -> None:
    text = recipe.read_text()
    base = tiny.model("llama", num_layers=4)
    stand_ins = [base] + [tiny.finetune(base, seed=s) for s in (1, 2, 3)]
    hub_ids = list(dict.fromkeys(re.findall(r"[\w.-]+/[\w.-]+(?=[\s+@\n]|$)", text)))
    hub_ids = [h for h in hub_ids if not h.startswith(".")]
    assert hub_ids, "an example recipe names at least one model"
    adapter = tiny.lora(base, rank=2)
    text = text.replace("./my-adapter", str(adapter))
    for hub_id, stand_in in zip(hub_ids, stand_ins):
        text = text.replace(hub_id, str(stand_in))
    # layer ranges of 32-layer models, scaled to the 4 tiny layers
    text = re.sub(r"layer_range: \[(\d+), (\d+)\]",
                  lambda m: f"layer_range: [{int(m[1]) // 8}, {int(m[2]) // 8}]", text)
    plan = build_plan(parse_recipe(text, source=recipe.name))
    assert plan.tensors and "estimated peak working memory" in describe_plan(plan)
