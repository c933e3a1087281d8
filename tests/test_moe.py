"""``mtool moe``: mergekit-moe's YAML, unchanged, gives mergekit-moe's model; the mixture loads and generates.

Every gate mode (random, uniform_random, cheap_embed and the hidden-state routers) and the Mixtral, Qwen2-MoE,
Qwen3-MoE and DeepSeek-MoE layouts are compared with mergekit-moe 0.1.5 (run with ``--random-seed`` equal to
mtool's ``--seed``): the same tensor names, dtypes and values (hidden-state routers within float tolerance; they
come out equal here), the same config.json and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mtool.errors import ConfigError
from mtool.moe.build import MoEOptions, execute_moe, plan_moe
from mtool.moe.config import load_moe_config
from mtool.tinymodels import load_tiny_model
from tests.support.compare import config_differences, load_tensors, model_differences, tokenizer_differences
from tests.support.mergekit_ref import SKIP_REASON, mergekit_error, mergekit_python, run_mergekit

PROMPTS = [["capital of France", "Paris"], ["reverse the string", "abc"], ["two plus two", "four"]]


def _configs(llama: tuple[str, list[str]], qwen3: tuple[str, list[str]]) -> dict[str, dict]:
    base, fts = llama
    prompted = [{"source_model": ft, "positive_prompts": PROMPTS[i]} for i, ft in enumerate(fts)]
    plain = [{"source_model": ft} for ft in fts]
    return {
        "mixtral-random": {"base_model": base, "gate_mode": "random", "experts": plain, "dtype": "bfloat16"},
        "mixtral-uniform-random": {"base_model": base, "gate_mode": "uniform_random", "experts": prompted,
                                   "dtype": "float32", "experts_per_token": 1},
        "mixtral-cheap-embed": {"base_model": base, "gate_mode": "cheap_embed", "experts": prompted},
        "mixtral-hidden": {"base_model": base, "gate_mode": "hidden",
                           "experts": [dict(prompted[0], negative_prompts=["hello"]), *prompted[1:]]},
        "mixtral-hidden-avg": {"base_model": base, "gate_mode": "hidden_avg", "experts": prompted[:2]},
        "qwen2-moe-cheap-embed": {"base_model": base, "architecture": "qwen", "gate_mode": "cheap_embed",
                                  "experts": prompted[:2], "shared_experts": [
                                      {"source_model": base, "positive_prompts": ["anything at all"]}]},
        "qwen2-moe-random": {"base_model": base, "architecture": "qwen", "gate_mode": "random", "experts": plain,
                             "shared_experts": [{"source_model": base}]},
        "qwen2-moe-hidden": {"base_model": base, "architecture": "qwen", "gate_mode": "hidden", "experts": prompted,
                             "shared_experts": [{"source_model": base, "positive_prompts": ["anything"],
                                                 "residual_scale": 0.5}]},
        "deepseek-random": {"base_model": base, "architecture": "deepseek", "gate_mode": "random", "experts": plain,
                            "shared_experts": [{"source_model": base}]},
        "qwen3-moe-cheap-embed": {"base_model": qwen3[0], "gate_mode": "cheap_embed",
                                  "experts": [{"source_model": ft, "positive_prompts": PROMPTS[i]}
                                              for i, ft in enumerate(qwen3[1])]},
    }


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("moe")

    def family(architecture: str) -> tuple[str, list[str]]:
        base = tiny.model(architecture, dtype=torch.bfloat16)
        fine_tunes = [tiny.finetune(base, seed=s, dtype=torch.bfloat16) for s in (1, 2, 3)]
        return str(base.resolve()), [str(ft.resolve()) for ft in fine_tunes]

    jobs = []
    for name, config in _configs(family("llama"), family("qwen3")).items():
        folder = work / name
        folder.mkdir()
        (folder / "moe.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        parsed, _, text = load_moe_config(folder / "moe.yaml")
        execute_moe(plan_moe(parsed, text, seed=7), folder / "mtool", MoEOptions(seed=7))
        jobs.append({"recipe": folder / "moe.yaml", "out": folder / "mergekit", "seed": 7, "kind": "moe"})
    if mergekit_python() is not None:
        run_mergekit(jobs, work=work)
    return work


CASES = list(_configs(("b", ["1", "2", "3"]), ("q", ["1", "2", "3"])))


@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES)
def test_same_model_as_mergekit_moe(built: Path, case: str) -> None:
    if mergekit_python() is None:
        pytest.skip(SKIP_REASON)
    ours, theirs = built / case / "mtool", built / case / "mergekit"
    assert mergekit_error(theirs) is None
    assert model_differences(ours, theirs) == []
    assert config_differences(ours, theirs) == []
    if "deepseek" not in case:  # DeepSeek's config names remote code, which its tokenizer loading would prompt for
        assert tokenizer_differences(ours, theirs) == []


@pytest.mark.parametrize("case", [c for c in CASES if "deepseek" not in c])
def test_mixture_loads_generates_and_routes(built: Path, case: str) -> None:
    from transformers import AutoTokenizer

    folder = built / case / "mtool"
    model = load_tiny_model(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    config = json.loads((folder / "config.json").read_text())
    experts = config.get("num_local_experts") or config.get("num_experts")
    gate = load_tensors(folder)["model.layers.0.mlp.gate.weight"]
    assert gate.shape == (experts, config["hidden_size"])


def test_router_vectors_follow_their_definition(built: Path) -> None:
    """cheap_embed: each router row is the normalized sum of its prompts' token embeddings (float64 here)."""
    from transformers import AutoTokenizer

    config = yaml.safe_load((built / "mixtral-cheap-embed" / "moe.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"])
    embedding = load_tensors(Path(config["base_model"]))["model.embed_tokens.weight"].double()
    gate = load_tensors(built / "mixtral-cheap-embed" / "mtool")["model.layers.1.mlp.gate.weight"].double()
    for row, expert in enumerate(config["experts"]):
        ids = [i for p in expert["positive_prompts"]
               for i in [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False).input_ids]]
        vector = embedding[ids].sum(dim=0)
        expected = vector / vector.norm()
        assert torch.allclose(gate[row], expected, atol=1e-2)  # the router is stored in bfloat16


def test_lineage_name_and_card(built: Path, run_cli) -> None:
    folder = built / "mixtral-cheap-embed" / "mtool"
    record = json.loads((folder / "mtool-lineage.json").read_text())
    assert record["method"] == "moe" and record["parameters"]["architecture"] == "Mixtral"
    assert {p["role"] for p in record["parents"]} == {"base", "model"} and len(record["parents"]) == 4
    name = run_cli("name", "suggest", folder).output.strip().splitlines()[-1]
    assert "-3x" in name and name.endswith("MoE-v1.0")
    assert "MoE" in (folder / "README.md").read_text()


@pytest.mark.parametrize("config, message", [
    ({"gate_mode": "hidden", "experts": [{"source_model": "A"}, {"source_model": "B"}]}, "no positive_prompts"),
    ({"gate_mode": "cheap_embed", "experts": [{"source_model": "A", "positive_prompts": ["x"]},
                                              {"source_model": "B", "positive_prompts": ["x"]}]}, "same prompts"),
    ({"gate_mode": "random", "experts_per_token": 3, "experts": [{"source_model": "A"}]}, "1 experts for 3"),
    ({"gate_mode": "hidden", "experts": [{"source_model": "A", "positive_prompts": ["x"]},
                                         {"source_model": "A", "positive_prompts": ["y"]}]}, "same model"),
])
def test_refuses_what_mergekit_moe_refuses(config, message) -> None:
    from mtool.moe.config import MoEConfig

    with pytest.raises(ConfigError, match=message):
        MoEConfig.model_validate({"base_model": "B", **config}).check()


def test_unknown_keys_warn_and_strict_refuses(built: Path, tmp_path, run_cli) -> None:
    config = yaml.safe_load((built / "mixtral-random" / "moe.yaml").read_text())
    config["expert_count"] = 3
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("moe", path, tmp_path / "out", "--strict", expect=2)
    assert "expert_count" in result.output and not (tmp_path / "out").exists()
    result = run_cli("moe", path, tmp_path / "out", "--seed", "7")
    assert "expert_count" in result.output
    assert model_differences(tmp_path / "out", built / "mixtral-random" / "mtool") == []


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[1] / "recipes" / "moe").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_configs_plan_on_tiny_models(example: Path, tiny, tmp_path) -> None:
    import re

    text = example.read_text()
    architecture = "qwen2" if "Qwen" in text else "llama"
    base = tiny.model(architecture)
    stand_ins = [base] + [tiny.finetune(base, seed=s) for s in (1, 2, 3, 4)]
    hub_ids = list(dict.fromkeys(re.findall(r"[\w.-]+/[\w.-]+(?=\s|$)", text)))
    for hub_id, stand_in in sorted(zip(hub_ids, stand_ins), key=lambda pair: -len(pair[0])):  # longest first
        text = re.sub(re.escape(hub_id) + r"(?=\s|$)", str(stand_in), text)
    (tmp_path / "moe.yaml").write_text(text)
    config, ignored, source = load_moe_config(tmp_path / "moe.yaml")
    plan = plan_moe(config, source)
    assert not ignored and plan.tensors and plan.layout.name in ("Mixtral", "Qwen MoE")
