"""``mtool adapters combine`` against PEFT's ``add_weighted_adapter``, and its weight-space merges against
``mtool merge`` run on ``base+adapter`` models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mtool.io.reading import open_checkpoint
from mtool.lineage import read_lineage
from mtool.lora.adapter import load_lora
from tests.support.peft_adapters import logits, make_peft_adapter, peft_model, relative

WEIGHTS = (0.7, -0.4)
DETERMINISTIC = {
    "linear": {}, "cat": {}, "svd": {}, "ties": {"density": 0.5}, "ties_svd": {"density": 0.6},
    "magnitude_prune": {"density": 0.5}, "magnitude_prune_svd": {"density": 0.4},
    # DARE keeps everything at density 1, so it is deterministic there
    "dare_linear": {"density": 1.0}, "dare_ties": {"density": 1.0}, "dare_ties_svd": {"density": 1.0},
    "dare_linear_svd": {"density": 1.0},
}


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    base = tiny.model("llama")
    folder = tmp_path_factory.mktemp("combine")
    first = make_peft_adapter(base, folder / "a1", seed=11, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "embed_tokens"])
    second = make_peft_adapter(base, folder / "a2", seed=12, r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    return base, first, second


def _peft_combined(base: Path, adapters: list[Path], kind: str, options: dict):
    model = peft_model(base, adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], list(WEIGHTS), "combined",
                                   combination_type=kind, density=options.get("density"),
                                   majority_sign_method=options.get("majority_sign_method", "total"),
                                   svd_rank=options.get("svd_rank"))
    model.set_adapter("combined")
    return model


def _factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "combined" in module.lora_A:
            found[name.removeprefix("base_model.model.")] = (module.lora_A["combined"].weight,
                                                             module.lora_B["combined"].weight)
        elif hasattr(module, "lora_embedding_A") and "combined" in module.lora_embedding_A:
            found[name.removeprefix("base_model.model.")] = (module.lora_embedding_A["combined"],
                                                             module.lora_embedding_B["combined"])
    return found


@pytest.mark.parametrize("kind", sorted(DETERMINISTIC))
def test_combine_matches_peft_add_weighted_adapter(kind, setup, tmp_path, run_cli):
    base, first, second = setup
    options = DETERMINISTIC[kind]
    out = tmp_path / "combined"
    args = ["adapters", "combine", first, second, out, "--method", kind, "--weights", ",".join(map(str, WEIGHTS))]
    if "density" in options:
        args += ["--density", options["density"]]
    run_cli(*args)

    reference = _factors(_peft_combined(base, [first, second], kind, options))
    ours = load_lora(out)
    assert {m.module for m in ours.targets.values()} == set(reference)
    for module in ours.targets.values():
        a, b = ours.factors(module.weight_name)
        peft_a, peft_b = reference[module.module]
        assert module.scale == 1.0
        if kind.endswith("svd"):  # singular vectors are defined up to sign: compare the products
            assert relative(b @ a, peft_b @ peft_a) <= 1e-5, module.module
        else:
            assert relative(a, peft_a) <= 1e-6 and relative(b, peft_b) <= 1e-6, module.module
    # the folder loads in PEFT and computes what PEFT's combined adapter computes
    assert torch.allclose(logits(peft_model(base, [out])), logits(_peft_combined(base, [first, second], kind, options)),
                          atol=2e-5)


def test_ties_frequency_sign_and_svd_rank(setup, tmp_path, run_cli):
    base, first, second = setup
    run_cli("adapters", "combine", first, second, tmp_path / "t", "--method", "ties", "--density", "0.7",
            "--majority-sign-method", "frequency", "--weights", "0.7,-0.4")
    reference = _factors(_peft_combined(base, [first, second], "ties",
                                        {"density": 0.7, "majority_sign_method": "frequency"}))
    ours = load_lora(tmp_path / "t")
    for module in ours.targets.values():
        assert relative(ours.factors(module.weight_name)[0], reference[module.module][0]) <= 1e-6
    run_cli("adapters", "combine", first, second, tmp_path / "s", "--method", "svd", "--rank", "2",
            "--weights", "0.7,-0.4")
    reference = _factors(_peft_combined(base, [first, second], "svd", {"svd_rank": 2}))
    ours = load_lora(tmp_path / "s")
    assert {m.rank for m in ours.targets.values()} == {2}
    for module in ours.targets.values():
        a, b = ours.factors(module.weight_name)
        assert relative(b @ a, reference[module.module][1] @ reference[module.module][0]) <= 1e-5


def test_dare_drops_are_seeded_per_module(setup, tmp_path, run_cli):
    _, first, second = setup
    outs = []
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        run_cli("adapters", "combine", first, second, tmp_path / name, "--method", "dare_linear", "--density", "0.5",
                "--seed", seed)
        outs.append(load_lora(tmp_path / name))
    name = "model.layers.0.self_attn.q_proj.weight"
    a_x, a_y, a_z = (o.factors(name)[0] for o in outs)
    assert torch.equal(a_x, a_y) and not torch.equal(a_x, a_z)
    # DARE keeps about half the entries of each input and rescales them by 1 / density
    assert 0.6 < float((a_x != 0).float().mean()) < 0.9  # kept by at least one of the two inputs: ~75%
    assert read_lineage(tmp_path / "x").seed == 1


def _mtool_merge(run_cli, folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli("merge", path, folder / "merged")
    return folder / "merged"


@pytest.mark.parametrize("method, parameters, use_base", [
    ("ties", {"density": 0.6}, False),
    ("task_arithmetic", {}, False),
    ("slerp", {"t": 0.3}, True),
])
def test_weight_space_merge_equals_mtool_merge_of_base_plus_adapters(method, parameters, use_base, setup, tmp_path,
                                                                     run_cli):
    """combine --method merge:M at full rank, merged into the base == mtool merge of base+adapter models."""
    base, first, second = setup
    models = [f"{base}+{first}", f"{base}+{second}"]
    if method == "slerp":
        recipe = {"merge_method": "slerp", "base_model": models[0], "parameters": {"t": parameters["t"]},
                  "slices": None, "models": [{"model": m} for m in models], "dtype": "float32"}
        recipe.pop("slices")
        extra = ["--param", f"t={parameters['t']}"]
    else:
        recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                  "models": [{"model": m, "parameters": {"weight": w, **parameters}} for m, w in zip(models, WEIGHTS)]}
        extra = (["--weights", ",".join(map(str, WEIGHTS))]
                 + (["--density", parameters["density"]] if parameters else []))
    expected = open_checkpoint(_mtool_merge(run_cli, tmp_path, recipe))
    args = ["adapters", "combine", first, second, tmp_path / "c", "--method", f"merge:{method}", "--rank", "64", *extra]
    if use_base:
        args += ["--base", base]
    result = run_cli(*args)
    assert "overall:" in result.output
    run_cli("adapters", "merge", base, tmp_path / "c", tmp_path / "applied")
    ours = open_checkpoint(tmp_path / "applied")
    for name in ours.names:
        assert relative(ours.read(name), expected.read(name)) <= 2e-6, name


def test_combine_bad_inputs(tiny, setup, tmp_path, run_cli):
    base, first, second = setup
    out = tmp_path / "out"
    other_rank = make_peft_adapter(base, tmp_path / "r2", r=2, lora_alpha=2, target_modules=["q_proj"])
    dora = make_peft_adapter(base, tmp_path / "dora", r=4, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    cases = [
        (["--method", "nonsense"], "unknown combination type 'nonsense'"),
        (["--method", "ties"], "needs --density"),
        (["--method", "merge:slerp", "--param", "t=0.5"], "give the base model with --base"),
        (["--method", "merge:nosuch"], "unknown merge method 'nosuch'"),
        (["--method", "svd", "--rank", "0"], "the rank must be a positive integer"),
        (["--method", "linear", "--weights", "1"], "1 values for 2 adapters"),
    ]
    for options, message in cases:
        result = run_cli("adapters", "combine", first, second, out, *options, expect=2)
        assert message in result.output, (options, result.output)
    assert "needs adapters of one rank" in run_cli("adapters", "combine", first, other_rank, out, "--method", "linear",
                                                   expect=2).output
    assert "cannot combine DoRA" in run_cli("adapters", "combine", first, dora, out, "--method", "cat", expect=2).output
    assert not out.exists()
    # DoRA adapters combine in weight space once the base is known
    run_cli("adapters", "combine", first, dora, out, "--method", "merge:linear", "--base", base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is False and read_lineage(out).parents[0].role == "base"
