"""What mtool does where a recipe says more than mergekit reads, and the settings where mtool computes otherwise.

mergekit 0.1.5 ignores unknown keys and parameters a method does not read; mtool computes the same model and warns
(``--strict`` refuses). The ``mtool:`` block opts into mtool's own behaviour, recorded in the lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtool.errors import ComputeError
from mtool.io.reading import open_checkpoint
from mtool.merger.methods import get_method
from mtool.merger.methods.base import MergeTask
from tests.support.compare import model_differences, steps_apart
from tests.support.parity_models import low_rank_finetune


@pytest.fixture(scope="module")
def family(tiny, tmp_path_factory) -> tuple[Path, Path, Path]:
    base = tiny.model("llama", num_layers=3, dtype=torch.bfloat16)
    root = tmp_path_factory.mktemp("compat")
    return base, low_rank_finetune(base, root / "ft1", seed=1), low_rank_finetune(base, root / "ft2", seed=2)


def _merge(run_cli, tmp_path: Path, name: str, text: str, *options: str, expect: int = 0):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text, encoding="utf-8")
    return run_cli("merge", recipe, tmp_path / name, "--no-card", *options, expect=expect)


def _ties(family, extra: str = "", per_model: str = "") -> str:
    base, ft1, ft2 = family
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, "
            f"density: 0.5{per_model}}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.7}}\n{extra}")


@pytest.mark.parametrize("extra, per_model, warning", [
    ("merge_methd: slerp\n", "", "recipe key 'merge_methd' is not read"),
    ("parameters: {epsilon: 0.1}\n", "", "merge method 'ties' has no parameter 'epsilon'"),
    ("", ", t: 0.5", "merge method 'ties' has no parameter 't'"),
    ("parameters: {lambda: 1.0}\n", ", lambda: 2.0", "reads 'lambda' once per tensor"),
])
def test_ignored_settings_warn_change_nothing_and_strict_refuses(family, tmp_path, run_cli, extra, per_model,
                                                                 warning) -> None:
    _merge(run_cli, tmp_path, "plain", _ties(family))
    result = _merge(run_cli, tmp_path, "noisy", _ties(family, extra, per_model))
    assert warning in result.output
    assert model_differences(tmp_path / "noisy", tmp_path / "plain") == []
    record = json.loads((tmp_path / "noisy" / "mtool-lineage.json").read_text())
    assert any(warning in message for message in record["warnings"])
    refused = _merge(run_cli, tmp_path, "strict", _ties(family, extra, per_model), "--strict", expect=2)
    assert refused.output.startswith("error: ") and warning in refused.output
    assert not (tmp_path / "strict").exists()


def test_sce_with_weights_is_mergekits_sce(family, tmp_path, run_cli) -> None:
    base, ft1, ft2 = family
    text = f"merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.9}}\n" \
           f"  - model: {ft2}\n    parameters: {{weight: 0.1}}\nparameters: {{select_topk: 0.5}}\n"
    weighted = _merge(run_cli, tmp_path, "weighted", text)
    assert "merge method 'sce' has no parameter 'weight'" in weighted.output
    _merge(run_cli, tmp_path, "plain", text.replace("weight: 0.9", "").replace("weight: 0.1", ""))
    assert model_differences(tmp_path / "weighted", tmp_path / "plain") == []


def test_base_weight_of_a_task_vector_method_is_ignored(family, tmp_path, run_cli) -> None:
    base, ft1, _ = family
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: " \
           f"{{weight: 5.0}}\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
    result = _merge(run_cli, tmp_path, "out", text)
    assert "does not use 'weight' for the base model" in result.output


def test_density_outside_its_range_is_accepted_with_a_warning(family, tmp_path, run_cli) -> None:
    result = _merge(run_cli, tmp_path, "wide", _ties(family).replace("density: 0.5", "density: 1.5"))
    assert "'density' = 1.5 lies outside [0, 1]" in result.output
    _merge(run_cli, tmp_path, "full", _ties(family).replace("density: 0.5", "density: 1.0"))
    assert model_differences(tmp_path / "wide", tmp_path / "full") == []  # mergekit: density >= 1 keeps all


def test_float32_math_is_one_rounding_of_the_exact_result(family, tmp_path, run_cli) -> None:
    """``mtool: {math: float32}``: TIES in float32, rounded once; mergekit rounds every step to bfloat16."""
    _merge(run_cli, tmp_path, "mergekit", _ties(family))
    _merge(run_cli, tmp_path, "float32", _ties(family, "mtool:\n  math: float32\n"))
    base, ft1, ft2 = (open_checkpoint(m) for m in family)
    name = "model.layers.1.mlp.up_proj.weight"
    b, x1, x2 = (m.read(name).double() for m in (base, ft1, ft2))
    deltas, weights, densities = [x1 - b, x2 - b], [0.6, 0.4], [0.5, 0.7]
    kept = []
    for delta, density in zip(deltas, densities):
        k = int(density * delta.numel())
        mask = torch.zeros(delta.numel(), dtype=torch.float64)
        mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
        kept.append(delta * mask.reshape(delta.shape))
    # the weighted deltas in float32, as float32 math forms them (their sum decides the sign where it is zero)
    weighted = [(torch.tensor(w, dtype=torch.float32) * d.float()).double() for w, d in zip(weights, kept)]
    elected = torch.where((weighted[0].float() + weighted[1].float()) >= 0, 1.0, -1.0).double()
    agree = [(torch.sign(d) == elected).double() for d in weighted]
    divisor = sum(a * w for a, w in zip(agree, weights))
    divisor[divisor == 0] = 1
    exact = b + sum(a * d for a, d in zip(agree, weighted)) / divisor
    ours = open_checkpoint(tmp_path / "float32").read(name)
    # float32 math rounded once: within half a bfloat16 step of the exact result, plus float32's own rounding of
    # terms as large as the base's entry (a result that cancels to near zero keeps that much absolute error)
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    assert bool(((ours.double() - exact).abs() <= spacing / 2 + 2 ** -22 * b.abs()).all())
    default = open_checkpoint(tmp_path / "mergekit").read(name)
    assert int(steps_apart(default, exact.bfloat16()).max()) > 1  # mergekit's bfloat16 steps round differently
    record = json.loads((tmp_path / "float32" / "mtool-lineage.json").read_text())
    assert record["parameters"]["math"] == "float32" and record["recipe"]["mtool"] == {"math": "float32"}


def test_dry_run_says_how_random_draws_differ(family, tmp_path, run_cli) -> None:
    text = _ties(family).replace("merge_method: ties", "merge_method: dare_ties") + "mtool:\n  post_layer_t: 1\n"
    recipe = tmp_path / "dare.yaml"
    recipe.write_text(text)
    output = run_cli("merge", recipe, "--dry-run").output
    assert "random draws: mtool's own, seeded by --seed" in output and "same probabilities" in output
    assert "mtool settings (differ from mergekit): post_layer_t=1" in output


def test_multislerp_of_unchanged_tensors_is_the_base_and_other_failures_name_the_tensor() -> None:
    method = get_method("multislerp")
    base = torch.randn(6, 5)
    same = [base.clone() for _ in range(3)]
    params = {"normalize_weights": True, "eps": 1e-8}
    task = MergeTask(name="model.norm.weight", inputs=[base, *same], model_params=[{}] + [{"weight": 1.0}] * 3,
                     params=params, base_index=0)
    assert torch.equal(method.merge(task), base)
    direction = torch.randn(6, 5)
    opposite = [direction, -direction, direction, -direction]  # exactly antipodal task vectors of a zero base
    task = MergeTask(name="model.layers.0.mlp.up_proj.weight", inputs=[torch.zeros(6, 5), *opposite],
                     model_params=[{}] + [{"weight": 1.0}] * 4, params=params, base_index=0)
    with pytest.raises(ComputeError, match="model.layers.0.mlp.up_proj.weight"):
        method.merge(task)


def test_modules_recipe_equals_models_recipe(family, tmp_path, run_cli) -> None:
    base, ft1, ft2 = family
    models = f"  - model: {ft1}\n    parameters: {{weight: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\n"
    _merge(run_cli, tmp_path, "models", f"merge_method: linear\nmodels:\n{models}")
    _merge(run_cli, tmp_path, "modules",
           "merge_method: linear\nmodules:\n  default:\n    models:\n" + models.replace("  - ", "      - ")
           .replace("    parameters", "        parameters"))
    assert model_differences(tmp_path / "modules", tmp_path / "models") == []


def test_vision_language_modules_by_name(tiny, tmp_path, run_cli) -> None:
    """A LLaVA recipe naming its modules as mergekit does: each module merged with its own settings."""
    from mtool.tinymodels import load_tiny_model

    base = tiny.model("llava", num_layers=3)
    ft1 = tiny.finetune(base, seed=1)
    text = (f"merge_method: slerp\nbase_model: {base}\nmodules:\n  text_decoder:\n    models:\n      - model: {base}\n"
            f"      - model: {ft1}\n    parameters: {{t: 0.8}}\n  vision_tower:\n    models:\n      - model: {base}\n"
            f"      - model: {ft1}\n    parameters: {{t: 0.0}}\n")
    _merge(run_cli, tmp_path, "vlm", text)
    merged, original = open_checkpoint(tmp_path / "vlm"), open_checkpoint(base)
    vision = "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(merged.read(vision), original.read(vision))  # t = 0: the base's
    text_layer = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged.read(text_layer), original.read(text_layer))
    load_tiny_model(tmp_path / "vlm")


def test_config_repairs_are_warned_and_recorded(tiny, tmp_path, run_cli) -> None:
    base = tiny.model("qwen3", num_layers=3)
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n" \
           f"  - sources:\n      - model: {base}\n        layer_range: [1, 3]\n"
    result = _merge(run_cli, tmp_path, "stack", text)
    assert "layer_types: 3 entries -> 4" in result.output
    record = json.loads((tmp_path / "stack" / "mtool-lineage.json").read_text())
    assert any("layer_types" in repair for repair in record["parameters"]["config_repairs"])
    assert len(json.loads((tmp_path / "stack" / "config.json").read_text())["layer_types"]) == 4
