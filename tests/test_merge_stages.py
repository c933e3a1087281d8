"""Multi-stage recipes (mergekit-multi's format): stages in dependency order, intermediates kept only when asked,
every stage in the result's lineage. (That the result equals mergekit-multi's is in test_mergekit_parity.py,
case example-mega.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtool.errors import ConfigError
from mtool.merger.stages import parse_stages
from tests.support.compare import model_differences


@pytest.fixture(scope="module")
def trio(tiny) -> tuple[Path, Path, Path]:
    base = tiny.model("llama")
    return base, tiny.finetune(base, seed=1), tiny.finetune(base, seed=2)


def _stages(trio) -> str:
    base, ft1, ft2 = trio
    return (f"name: blend\nmerge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
            f"parameters: {{t: [0.2, 0.8]}}\n---\n"
            f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: blend\n    parameters: {{weight: 0.5, "
            f"density: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.6}}\n")


def test_stages_run_in_order_and_equal_separate_runs(trio, tmp_path, run_cli) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_stages(trio))
    output = run_cli("merge", recipe, tmp_path / "out").output
    assert output.index("stage 1 of 2: blend") < output.index("stage 2 of 2: result")
    assert not any(p.name.startswith(".mtool-stages") for p in tmp_path.iterdir())  # intermediates removed
    first, second = _stages(trio).split("---\n")
    (tmp_path / "one.yaml").write_text(first)
    run_cli("-q", "merge", tmp_path / "one.yaml", tmp_path / "blend")
    (tmp_path / "two.yaml").write_text(second.replace("model: blend", f"model: {tmp_path / 'blend'}"))
    run_cli("-q", "merge", tmp_path / "two.yaml", tmp_path / "separate")
    assert model_differences(tmp_path / "out", tmp_path / "separate") == []
    record = json.loads((tmp_path / "out" / "mtool-lineage.json").read_text())
    assert [stage["name"] for stage in record["parameters"]["stages"]] == ["blend", None]
    assert record["parameters"]["stages"][0]["recipe"]["merge_method"] == "slerp"
    intermediate = next(p for p in record["parents"] if p["id"] == "stage:blend")
    assert intermediate["lineage"]["method"] == "slerp"  # the intermediate's own record travels along


def test_intermediate_dir_keeps_and_reuses_stages(trio, tmp_path, run_cli) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_stages(trio))
    run_cli("merge", recipe, tmp_path / "out", "--intermediate-dir", tmp_path / "stages")
    kept = tmp_path / "stages" / "blend"
    assert (kept / "mtool-lineage.json").is_file()
    stamp = (kept / "model.safetensors").stat().st_mtime_ns
    output = run_cli("merge", recipe, tmp_path / "out", "--intermediate-dir", tmp_path / "stages", "--force").output
    assert "reused" in output and (kept / "model.safetensors").stat().st_mtime_ns == stamp
    recipe.write_text(_stages(trio).replace("t: [0.2, 0.8]", "t: 0.5"))  # a changed stage is merged again
    output = run_cli("merge", recipe, tmp_path / "out", "--intermediate-dir", tmp_path / "stages", "--force").output
    assert "reused" not in output and (kept / "model.safetensors").stat().st_mtime_ns != stamp


def test_dry_run_plans_what_it_can(trio, tmp_path, run_cli) -> None:
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_stages(trio))
    output = run_cli("merge", recipe, "--dry-run").output
    assert "stage blend:" in output and "merge method: slerp" in output
    assert "stage result: planned once blend exists" in output


@pytest.mark.parametrize("text, message", [
    ("name: a\nmerge_method: linear\nmodels:\n  - model: b\n---\nname: b\nmerge_method: linear\nmodels:\n"
     "  - model: a\n", "circle"),
    ("name: a\nmerge_method: linear\nmodels:\n  - model: x\n---\nname: a\nmerge_method: linear\nmodels:\n"
     "  - model: a\n", "same name"),
    ("merge_method: linear\nmodels:\n  - model: x\n---\nmerge_method: linear\nmodels:\n  - model: y\n",
     "more than one stage has no name"),
    ("name: a\nmerge_method: linear\nmodels:\n  - model: x\n---\nname: b\nmerge_method: linear\nmodels:\n"
     "  - model: y\n", "no single result"),
])
def test_malformed_stage_sets_are_refused(text, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_stages(text, source="multi.yaml")


def test_example_stage_recipe_parses_in_order() -> None:
    text = (Path(__file__).resolve().parents[1] / "recipes" / "stages" / "slerp-then-ties.yaml").read_text()
    stages = parse_stages(text, source="slerp-then-ties.yaml")
    assert [s.name for s in stages] == ["hermes-zephyr", None] and stages[1].needs == {"hermes-zephyr"}
