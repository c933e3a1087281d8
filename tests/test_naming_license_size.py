"""License resolution from parents, and size labels against llama.cpp's gguf-py and a float64 count."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mtool.lineage import Lineage, Parent
from mtool.naming.card import parent_license
from mtool.naming.family import family_from_config, family_from_model_id
from mtool.naming.license import ParentLicense, normalize_license, resolve_license
from mtool.naming.size import ParameterCount, count_parameters, size_deviation, size_label


def _resolve(*licenses: str | None, **kwargs):
    return resolve_license([ParentLicense(f"parent{i}", value) for i, value in enumerate(licenses)], **kwargs)


def test_apache_and_llama2_give_llama2_with_its_notice() -> None:
    result = _resolve("apache-2.0", "llama2")
    assert result.front_matter == {"license": "llama2"}
    assert result.notices == ["Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta "
                              "Platforms, Inc. All Rights Reserved."]
    assert "keep the parents' copyright and NOTICE texts" in result.conditions  # Apache's terms are kept too
    assert not result.reports and not result.non_commercial


def test_a_non_commercial_parent_makes_the_output_non_commercial() -> None:
    result = _resolve("apache-2.0", "cc-by-nc-4.0", "llama3.1")
    assert result.license == "cc-by-nc-4.0" and result.non_commercial
    assert "Built with Llama" in result.attributions and result.name_prefix == "Llama"
    assert "non-commercial use only" in result.conditions


def test_unknown_and_missing_licenses_give_other_and_are_reported() -> None:
    result = _resolve("apache-2.0", "my-own-license")
    assert result.front_matter == {"license": "other"}
    assert any("unknown license 'my-own-license'" in r for r in result.reports)
    assert any("without license_name and license_link" in r for r in result.reports)
    assert any("declares no license" in r for r in _resolve("mit", None).reports)


def test_custom_other_license_keeps_its_name_and_link() -> None:
    result = resolve_license([ParentLicense("a", "other", "acme-model-license", "https://acme.example/license")])
    assert result.front_matter == {"license": "other", "license_name": "acme-model-license",
                                   "license_link": "https://acme.example/license"}
    assert any("custom license" in r for r in result.reports)


def test_known_other_licenses_and_conflicts() -> None:
    qwen = resolve_license([ParentLicense("Qwen/Qwen2.5-72B", "other", "qwen"), ParentLicense("b", "apache-2.0")])
    assert qwen.front_matter["license_name"] == "qwen" and qwen.front_matter["license_link"].startswith("https://")
    assert "Built with Qwen" in qwen.attributions
    both = _resolve("llama3", "gemma")
    assert both.front_matter == {"license": "other", "license_name": "llama3-and-gemma"}
    assert len(both.notices) == 2 and any("all bind this model" in r for r in both.reports)
    assert _resolve("mit", "apache-2.0").license == "apache-2.0"  # permissive licenses combine
    nd = _resolve("cc-by-nc-nd-4.0", "apache-2.0")
    assert nd.derivatives_forbidden and any("forbids distributing derivatives" in r for r in nd.reports)


def test_override_and_normalization() -> None:
    assert normalize_license("Apache 2.0") == "apache-2.0" and normalize_license("Llama-3.1") == "llama3.1"
    assert normalize_license("MIT") == "mit" and normalize_license("") is None
    weaker = _resolve("llama3.1", override="mit")
    assert weaker.license == "mit" and any("less restrictive" in r for r in weaker.reports)


def test_parent_license_from_its_card_its_record_or_its_publisher(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: acme\nlicense_link: https://a.example\n"
                                        "---\n", encoding="utf-8")
    from_card = parent_license(Parent(id=str(tmp_path), role="model", path=str(tmp_path)))
    assert (from_card.license, from_card.license_name, from_card.license_link) == ("other", "acme", "https://a.example")
    record = Lineage(operation="train", parents=[Parent(id="x/y", role="base", is_hub=True, license="gemma")])
    assert parent_license(Parent(id="./local", role="model", lineage=record)).license == "gemma"
    inferred = parent_license(Parent(id="meta-llama/Llama-3.1-8B", role="base", is_hub=True))
    assert inferred.license == "llama3.1" and inferred.inferred
    assert any("inferred from its publisher" in r for r in resolve_license([inferred]).reports)


def test_size_label_matches_llama_cpp_on_random_counts() -> None:
    gguf = pytest.importorskip("gguf")
    generator = random.Random(0)
    for _ in range(2000):
        total = int(10 ** generator.uniform(3.5, 12.5))
        if total in (10**6, 10**9, 10**12):
            continue
        assert size_label(total) == gguf.size_label(total, total, 0, 0), total
        experts = generator.choice([4, 8, 16])
        expert = int(total * generator.uniform(0.5, 0.95)) // experts * experts
        counted = ParameterCount(total=total, expert=expert, experts=experts)
        assert size_label(counted) == gguf.size_label(total, total - expert, expert // experts, experts)


def test_well_known_sizes() -> None:
    assert size_label(8_030_261_248) == "8.0B"  # Llama-3.1-8B
    assert size_label(70_553_706_496) == "71B"
    assert size_label(494_032_768) == "494M"  # Qwen2.5-0.5B
    mixtral = ParameterCount(total=46_702_792_704, expert=45_097_156_608, experts=8)
    assert size_label(mixtral) == "8x7.2B"
    assert size_deviation("7B", ParameterCount(7_241_732_096)) == 0.0  # publisher rounding at its precision
    assert size_deviation("70B", ParameterCount(70_553_706_496)) == 0.0
    assert size_deviation("7B", ParameterCount(8_537_680_896)) == pytest.approx(1 - 7e9 / 8_537_680_896)
    assert size_deviation("8x7B", ParameterCount(7_241_732_096)) is None  # a mixture named for a dense model


def test_count_parameters_separates_the_experts_of_a_mixture(tmp_path: Path) -> None:
    import torch

    from mtool.io.writing import save_tensors

    experts, hidden, inner, vocab = 4, 8, 16, 32
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "lm_head.weight": torch.zeros(vocab, hidden)}
    for layer in range(2):
        tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = torch.zeros(experts, hidden)
        for expert in range(experts):
            for w in ("w1", "w3"):
                tensors[f"model.layers.{layer}.block_sparse_moe.experts."
                        f"{expert}.{w}.weight"] = torch.zeros(inner, hidden)
            tensors[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight"] = torch.zeros(hidden, inner)
    save_tensors(tmp_path, tensors)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": experts}))
    counted = count_parameters(tmp_path)
    total = sum(t.numel() for t in tensors.values())
    expert = sum(t.numel() for name, t in tensors.items() if ".experts." in name)
    assert (counted.total, counted.expert, counted.experts) == (total, expert, experts)
    per_expert = total - expert + expert / experts  # shared weights + one expert's, in float64
    assert counted.per_expert_model == pytest.approx(per_expert)
    assert size_label(counted).startswith(f"{experts}x")


def test_family_from_ids_and_configs() -> None:
    cases = {
        "meta-llama/Llama-3.1-8B-Instruct": ("Llama-3.1", "8B", "Instruct"),
        "meta-llama/Meta-Llama-3-8B-Instruct": ("Llama-3", "8B", "Instruct"),
        "meta-llama/Llama-2-7b-chat-hf": ("Llama-2", "7B", "chat"),
        "mistralai/Mistral-7B-v0.1": ("Mistral-v0.1", "7B", None),
        "mistralai/Mixtral-8x7B-Instruct-v0.1": ("Mixtral-v0.1", "8x7B", "Instruct"),
        "Qwen/Qwen2.5-0.5B": ("Qwen2.5", "500M", None),
        "google/gemma-2-9b-it": ("gemma-2", "9B", "it"),
        "microsoft/phi-2": ("phi-2", None, None),
        "Gryphe/MythoMax-L2-13b": ("Llama-2", "13B", None),
    }
    for model_id, (family, size, variant) in cases.items():
        found = family_from_model_id(model_id)
        assert (found.family, found.size, found.variant) == (family, size, variant), model_id
    assert family_from_config({"model_type": "llama", "vocab_size": 128256,
                               "rope_scaling": {"rope_type": "llama3"}}).family == "Llama-3.1"
    assert family_from_config({"model_type": "mistral", "vocab_size": 32768}).family == "Mistral-v0.3"
    assert family_from_config({"model_type": "gemma2"}).family == "gemma-2"
    assert family_from_config({}) is None
