"""SLERP with t outside [0, 1]: allowed (mergekit allows it), computed by the same formula, warned about once and
recorded in the lineage record and the card."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file


def slerp_float64(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors, extrapolating for t > 1 (lerp when nearly parallel)."""
    a, b = v0.double().flatten(), v1.double().flatten()
    dot = float(torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    s0, s1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (s0 * a + s1 * b).reshape(v0.shape)


def test_slerp_beyond_one_warns_records_and_extrapolates(tiny, tmp_path, run_cli) -> None:
    base = tiny.model("llama")
    tuned = tiny.finetune(base, seed=5, scale=0.2)
    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {tuned}\n"
                      "parameters:\n  t: 1.5\n")
    out = tmp_path / "out"
    result = run_cli("merge", recipe, out)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "parameter 't' = 1.5 lies outside [0, 1]" in warnings[0]
    record = json.loads((out / "mtool-lineage.json").read_text())
    assert record["warnings"] == [warnings[0].removeprefix("warning: ")]
    assert "## Warnings" in (out / "README.md").read_text() and "'t' = 1.5" in (out / "README.md").read_text()
    merged, w0, w1 = (load_file(folder / "model.safetensors") for folder in (out, base, tuned))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name].double(), slerp_float64(1.5, w0[name], w1[name]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged[name], w1[name])  # beyond the tuned model, not clamped to it


def test_slerp_within_range_has_no_warning(tiny, tmp_path, run_cli) -> None:
    base = tiny.model("llama")
    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                      f"  - model: {tiny.finetune(base, seed=5, scale=0.2)}\nparameters:\n  t: [0, 1]\n")
    result = run_cli("merge", recipe, tmp_path / "out")
    assert "warning:" not in result.stderr
    assert "warnings" not in json.loads((tmp_path / "out" / "mtool-lineage.json").read_text())
