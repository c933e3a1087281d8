"""The naming schema: parse, lint and rewrite on real-world-style names; relations; GGUF and Hub agreement."""

from __future__ import annotations

import json

import pytest

from mtool.errors import InputError
from mtool.naming.check import parse_name
from mtool.naming.lint import lint_name
from mtool.naming.methods import METHODS, find_method, method_of_record
from mtool.naming.rules import RULES
from mtool.naming.schema import ModelName, decompose

# name -> (findings' rule ids at warning/error level, suggested name or None)
NAMES: dict[str, tuple[set[str], str | None]] = {
    # cryptic community names
    "MythoMax-L2-Kimiko-v2-13B-slerp-DARE-v0.3-GGUF": (
        {"method-spelling", "multiple-methods", "no-label", "family-position"},
        "Llama-2-13B-MythoMaxKimikoV2-DARE-TIES-v0.3-GGUF"),
    "NeuralHermes-2.5-Mistral-7B-slerp": (
        {"no-version", "method-spelling", "no-label", "family-position"}, "Mistral-7B-NeuralHermesV2.5-SLERP-v1.0"),
    "Llama-3-8B-Instruct-abliterated-DARE-TIES": ({"no-version"}, "Llama-3-8B-Instruct-Abliterated-DARE-TIES-v1.0"),
    "L3-8B-Stheno-v3.2": ({"no-method", "family-shorthand"}, None),
    "Noromaid-13b-v0.3-lora": ({"lora-spelling", "size-format", "no-method", "no-label"}, None),
    "Hermes-2-Pro-Llama-3-8B": ({"no-version", "no-method", "no-label", "family-position"}, None),
    "unsloth/llama-3-8b-bnb-4bit": ({"no-version", "size-format", "no-method", "no-label", "family-spelling"}, None),
    "TheBloke/Mistral_7B_dpo_v1": ({"underscore", "version-format", "method-spelling", "no-label"}, None),
    "Qwen2.5-7B-Instruct-Coder-dare_ties-v1.0": ({"method-spelling"}, "Qwen2.5-7B-Instruct-Coder-DARE-TIES-v1.0"),
    # publishers' base-model names: not derivatives, so no Label/Method
    "Mistral-7B-Instruct-v0.2": ({"no-method", "label-variant"}, None),
    "Mixtral-8x7B-Instruct-v0.1": ({"no-method", "label-variant"}, None),
    # conforming names
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA": (set(), None),
    "Mistral-v0.1-7B-MythoKimiko-SLERP-v1.0": (set(), None),
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-F16-LoRA": (set(), None),
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-F16": (set(), None),
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA-Q4_K_M-GGUF": (set(), None),
    "Qwen2.5-7B-Instruct-Coder-DARE-TIES-v1.2-Q4_K_M": (set(), None),
    "gemma-2-9B-it-Tutor-ORPO-v0.1": (set(), None),
    "Qwen2.5-500M-Instruct-Math-GRPO-v2.0": (set(), None),
    "Mixtral-v0.1-8x7.2B-Instruct-RolePlay-MoE-v1.0": (set(), None),
    "Llama-3.1-70B-Instruct-Lorablated-TaskArith-v1.0": (set(), None),
    "Llama-3.1-8B-Medic-Extract-v1.0-LoRA": (set(), None),
    "Phi-3-3.8B-Mini4kInstruct-Tool-SFT-v1.0-GGUF": (set(), None),
    "SOLAR-v1.0-11B-Instruct-Uncensored-DPO-v1.0": (set(), None),
    # one mistake each
    "Llama-3.1-8B-Medic-slerp-v1.0": ({"method-spelling"}, "Llama-3.1-8B-Medic-SLERP-v1.0"),
    "Llama-3.1-8B-Medic-SFT-v1": ({"version-format"}, "Llama-3.1-8B-Medic-SFT-v1.0"),
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0.2": ({"version-format"}, "Llama-3.1-8B-Instruct-Medic-SFT-v1.0"),
    "Llama-3.1-8B-Medic-SFT": ({"no-version"}, "Llama-3.1-8B-Medic-SFT-v1.0"),
    "Llama-3.1-8B-Q4_K_M-Medic-SFT-v1.0": ({"quant-position"}, "Llama-3.1-8B-Medic-SFT-v1.0-Q4_K_M"),
    "Llama-3.1-8b-Medic-SFT-v1.0": ({"size-format"}, "Llama-3.1-8B-Medic-SFT-v1.0"),
    "Qwen2.5-0.5B-Instruct-Math-GRPO-v2.0": ({"size-format"}, "Qwen2.5-500M-Instruct-Math-GRPO-v2.0"),
    "L3.1-8B-Medic-SFT-v1.0": ({"family-shorthand"}, "Llama-3.1-8B-Medic-SFT-v1.0"),
    "Meta-Llama-3-8B-Instruct-Medic-DPO-v1.0": ({"family-spelling"}, "Llama-3-8B-Instruct-Medic-DPO-v1.0"),
    "8B-Medic-SFT-v1.0": ({"no-family"}, None),
    "Llama-3.1-Medic-SFT-v1.0": ({"no-size"}, None),
    "Llama-3.1-8B-SFT-v1.0": ({"no-label"}, None),
    "Llama-3.1-8B-Instruct-SFT-v1.0": ({"label-variant"}, None),
    "Llama-3.1-8B-Instruct-Medical-Chat-Bot-SFT-v1.0": (
        {"too-many-parts"}, "Llama-3.1-8B-Instruct-MedicalChatBot-SFT-v1.0"),
    "Mistral-7B-Médic-SFT-v1.0": ({"ascii"}, "Mistral-7B-Medic-SFT-v1.0"),
    "Llama--3.1-8B-Medic-SFT-v1.0": ({"double-separator"}, "Llama-3.1-8B-Medic-SFT-v1.0"),
    "Llama-3.1-8B-Medic-Merge-v1.0": ({"no-method"}, None),
    "Llama-3.1-8B-Medic-SLERP-TIES-v1.0": ({"multiple-methods"}, "Llama-3.1-8B-Medic-TIES-v1.0"),
    "Llama-3.1-8B-Medic-SFT-v1.0-lora": ({"lora-spelling"}, "Llama-3.1-8B-Medic-SFT-v1.0-LoRA"),
    "Llama-3.1-8B-Instruct-Medic.Bot-SFT-v1.0": ({"dot-outside-number"}, None),
    "Llama-3.1-8B-Instruct-This-Name-Is-Really-Long-And-Keeps-Going-On-And-On-Forever-Ever-SFT-v1.0-Q4_K_M": (
        {"length", "too-many-parts"},
        "Llama-3.1-8B-Instruct-ThisNameIsReallyLongAndKeepsGoingOnAndOnForeverEver-SFT-v1.0-Q4_K_M"),
    "Llama-3.1-8B-Instruct-ThisLabelIsReallyLongAndKeepsGoingOnAndOnForeverAndEverAndEverMore-SFT-v1.0": (
        {"length"}, None),
}

# conforming names -> their parts
PARTS: dict[str, dict[str, object]] = {
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA": dict(
        family="Llama-3.1", size="8B", base_variant="Instruct", label="Medic", method="SFT", version="v1.0",
        lora=True, encoding=None, relation="adapter"),
    "Mistral-v0.1-7B-MythoKimiko-SLERP-v1.0": dict(
        family="Mistral-v0.1", size="7B", base_variant=None, label="MythoKimiko", method="SLERP", version="v1.0",
        lora=False, encoding=None, relation="merge"),
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-F16-LoRA": dict(
        family="Llama-3.1", size="8B", base_variant="Instruct", label="Medic", method="SFT", version="v1.0",
        lora=True, encoding="F16", relation="quantized"),
    "Qwen2.5-7B-Instruct-Coder-DARE-TIES-v1.2-Q4_K_M": dict(
        family="Qwen2.5", size="7B", base_variant="Instruct", label="Coder", method="DARE-TIES", version="v1.2",
        lora=False, encoding="Q4_K_M", relation="quantized"),
    "gemma-2-9B-it-Tutor-ORPO-v0.1": dict(
        family="gemma-2", size="9B", base_variant="it", label="Tutor", method="ORPO", version="v0.1", lora=False,
        encoding=None, relation="finetune"),
    "Mixtral-v0.1-8x7.2B-Instruct-RolePlay-MoE-v1.0": dict(
        family="Mixtral-v0.1", size="8x7.2B", base_variant="Instruct", label="RolePlay", method="MoE",
        version="v1.0", lora=False, encoding=None, relation="merge"),
    "Llama-3.1-8B-Medic-Extract-v1.0-LoRA": dict(
        family="Llama-3.1", size="8B", base_variant=None, label="Medic", method="Extract", version="v1.0",
        lora=True, encoding=None, relation="adapter"),
    "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA-Q4_K_M-GGUF": dict(
        family="Llama-3.1", size="8B", base_variant="Instruct", label="Medic", method="SFT", version="v1.0",
        lora=True, encoding="Q4_K_M-GGUF", relation="quantized"),
}


def test_the_table_is_large_enough() -> None:
    assert len(NAMES) >= 30
    assert sum(1 for rules, _ in NAMES.values() if rules) >= 20


@pytest.mark.parametrize("name", list(NAMES))
def test_lint_finds_exactly_the_expected_rules_and_suggests_the_fix(name: str) -> None:
    expected_rules, expected_suggestion = NAMES[name]
    report = lint_name(name)
    found = {f.rule for f in report.findings if f.severity != "info"}
    assert found == expected_rules
    assert report.ok == (not any(RULES[r].severity == "error" for r in expected_rules))
    assert report.suggestion == expected_suggestion
    for finding in report.findings:
        assert finding.fix and "\n" not in finding.fix
    if expected_suggestion is not None:  # a proposed fix is itself clean
        assert not [f for f in lint_name(expected_suggestion).findings if f.severity != "info"]


@pytest.mark.parametrize("name", list(NAMES))
def test_parse_accepts_exactly_the_names_without_errors(name: str) -> None:
    expected_rules, _ = NAMES[name]
    has_error = any(RULES[r].severity == "error" and r not in ("family-position",) for r in expected_rules)
    if has_error:
        with pytest.raises(InputError):
            parse_name(name)
    else:
        parsed = parse_name(name)
        assert isinstance(parsed, ModelName)


@pytest.mark.parametrize("name", list(PARTS))
def test_parse_gives_the_parts_and_formats_back(name: str) -> None:
    parsed = parse_name(name)
    assert parsed.to_dict() == PARTS[name]
    reparsed = parse_name(parsed.format())
    assert reparsed == parsed
    if "-F16-LoRA" not in name:  # the one accepted non-canonical order (llama.cpp's file order)
        assert parsed.format() == name


def test_every_name_of_the_closed_list_parses_with_its_relation() -> None:
    for method in METHODS:
        lora = method.kind == "adapter"
        name = ModelName(family="Llama-3.1", size="8.0B", label="Demo", method=method.name, lora=lora)
        parsed = parse_name(name.format())
        assert parsed.method == method.name
        assert parsed.relation == ("adapter" if lora else method.relation)
        assert find_method(method.name.lower()) is method


def test_relation_of_methods() -> None:
    assert parse_name("Llama-3.1-8B-Medic-SFT-v1.0").relation == "finetune"
    assert parse_name("Llama-3.1-8B-Medic-DPO-v1.0-LoRA").relation == "adapter"
    assert parse_name("Llama-3.1-8B-Medic-TIES-v1.0-LoRA").relation == "adapter"
    assert parse_name("Llama-3.1-8B-Medic-Passthrough-v1.0").relation == "merge"
    assert parse_name("Llama-3.1-8B-Medic-SLERP-v1.0-GGUF").relation == "quantized"


def test_every_merge_method_mtool_runs_has_a_name() -> None:
    from mtool.merger.methods import METHODS as MERGE_METHODS

    for method_name in MERGE_METHODS:
        method = method_of_record(method_name)
        assert method is not None and method.kind == "merge", method_name
    for combination in ("linear", "cat", "svd", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                        "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"):
        assert method_of_record(combination).kind == "merge", combination


def test_hub_validity_agrees_with_huggingface_hub() -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hub_rules = {"ascii", "chars", "length", "double-separator", "edge-separator"}
    extra = ["-Llama-3.1-8B-Medic-SFT-v1.0", "Llama-3.1-8B-Medic-SFT-v1.0.", "Llama-3.1-8B-Medic..Bot-SFT-v1.0",
             "Llama 3.1-8B-Medic-SFT-v1.0", "Llama-3.1-8B-" + "A" * 90 + "-SFT-v1.0"]
    for name in list(NAMES) + extra:
        bare = name.split("/")[-1]
        flagged = {f.rule for f in decompose(bare).findings} & hub_rules
        if flagged:
            with pytest.raises(HFValidationError):
                validate_repo_id(bare)
        else:
            validate_repo_id(bare)
    for name in extra:
        assert {f.rule for f in decompose(name).findings} & hub_rules


def test_gguf_converter_rebuilds_the_name_from_the_card_fields() -> None:
    gguf = pytest.importorskip("gguf")
    for name in PARTS:
        parsed = parse_name(name)
        fields = parsed.gguf_fields()
        rebuilt = gguf.naming_convention(fields["model_name"], fields["model_basename"], fields["model_finetune"],
                                         fields["model_version"], fields["model_size_label"],
                                         output_type=parsed.encoding, model_type="LoRA" if parsed.lora else None)
        expected = "-".join(p for p in (parsed.family, parsed.size, parsed.finetune, parsed.version, parsed.encoding,
                                        "LoRA" if parsed.lora else None) if p)
        assert rebuilt == expected
        if parsed.encoding is None:
            assert rebuilt == parsed.format()


def test_cli_parse_prints_the_parts_as_json(run_cli) -> None:
    result = run_cli("name", "parse", "Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA")
    data = json.loads(result.output)
    assert data["conforms"] is True
    assert {k: data[k] for k in PARTS["Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA"]} == \
        PARTS["Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA"]
    assert data["gguf"]["model_finetune"] == "Instruct-Medic-SFT"


def test_cli_parse_of_a_community_name_exits_1_with_the_reading_and_a_rewrite(run_cli) -> None:
    result = run_cli("name", "parse", "MythoMax-L2-Kimiko-v2-13B-slerp-DARE-v0.3-GGUF", expect=1)
    data = json.loads(result.output)
    assert data["conforms"] is False
    assert data["size"] == "13B" and data["version"] == "v0.3" and data["encoding"] == "GGUF"
    assert {e["rule"] for e in data["errors"]} == {"multiple-methods", "no-label", "family-position"}  # as lint says
    assert data["suggestion"] == "Llama-2-13B-MythoMaxKimikoV2-DARE-TIES-v0.3-GGUF"


def test_cli_lint_exit_codes_and_json(run_cli) -> None:
    clean = run_cli("name", "lint", "Mistral-v0.1-7B-MythoKimiko-SLERP-v1.0")
    assert "ok" in clean.output
    warned = run_cli("name", "lint", "Llama-3.1-8B-Medic-slerp-v1.0")  # warnings only: exit 0
    assert "method-spelling" in warned.output and "Llama-3.1-8B-Medic-SLERP-v1.0" in warned.output
    failed = run_cli("name", "lint", "--json", "Llama-3.1-8B-Medic-SFT", expect=1)
    data = json.loads(failed.output)
    assert data["ok"] is False
    assert [f["rule"] for f in data["findings"]] == ["no-version"]
    assert data["findings"][0]["severity"] == "error" and data["findings"][0]["fix"]
    assert data["suggestion"] == "Llama-3.1-8B-Medic-SFT-v1.0"
