"""The same recipe through mtool and mergekit 0.1.5: the same model.

Every case runs in both tools (mergekit in its own environment, all cases in one process) and the outputs are
compared: the same tensor names, shapes and dtypes; float32 values within 1e-6 of the tensor's largest
magnitude, 16-bit values equal or one rounding step apart; the same config.json and tokenizer. The cases are

* mergekit's own repository tests (tests/test_basic_merges.py, test_tokenizer.py, test_chat_template.py) and
  examples (examples/*.yml, the multi-stage examples/mega.yml), rewritten to tiny local models;
* every recipe of recipes/merge, its Hub models replaced by tiny ones;
* every method, on bfloat16 models whose task vectors hold many equal magnitudes and on float32 models, with
  gradients, filters and several slices.

A case that does not compare equal says why: mergekit fails on it (and mtool's output loads), or the documented
difference it exercises (random draws).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtool.merger.plan import build_plan
from mtool.merger.recipe import parse_recipe
from mtool.merger.run import MergeOptions, execute
from mtool.merger.stages import is_multi_stage, parse_stages, run_stages
from tests.support.compare import config_differences, load_tensors, model_differences, tokenizer_differences
from tests.support.mergekit_ref import SKIP_REASON, mergekit_error, mergekit_python, run_mergekit
from tests.support.parity_models import low_rank_finetune, pico_llama

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "merge"

EQUAL = "equal"
RANDOM = "random"  # DARE / DELLA keep different random entries (mtool's draws are seeded and order-independent)
MERGEKIT_FAILS = "mergekit fails"
BOTH_FAIL = "both fail"


@dataclass
class Case:
    name: str
    recipe: str  # YAML; <<key>> stands for the path of the model called key
    expect: str = EQUAL
    seed: int | None = None
    tokenizer: bool = False  # compare the tokenizers too
    mtool_error: str | None = None  # with BOTH_FAIL: what mtool says
    builtin_template: bool = False  # chat_template names a built-in: compared by what it renders (whitespace aside)

    def text(self, models: dict[str, str]) -> str:
        return re.sub(r"<<([\w-]+)>>", lambda match: models[match.group(1)], self.recipe)


def _models(*entries: tuple[str, str | None]) -> str:
    lines = ["models:"]
    for model, parameters in entries:
        lines.append(f"  - model: <<{model}>>")
        if parameters:
            lines.append(f"    parameters: {parameters}")
    return "\n".join(lines) + "\n"


def _two(method: str, base: str | None = None, params: str | None = None, a: str = "a", b: str = "b") -> str:
    """test_basic_merges.two_model_config: weights 0.6 / 0.4, bfloat16, global parameters."""
    text = f"merge_method: {method}\n" + _models((a, "{weight: 0.6}"), (b, "{weight: 0.4}")) + "dtype: bfloat16\n"
    if base:
        text += f"base_model: <<{base}>>\n"
    if params:
        text += f"parameters: {params}\n"
    return text


def _slices(*slices: tuple[list[tuple[str, int, int, str | None]], str | None]) -> str:
    """``slices:`` from ``([(model, start, end, parameters)...], slice parameters)``."""
    lines = ["slices:"]
    for sources, parameters in slices:
        lines.append("  - sources:")
        for model, start, end, source_parameters in sources:
            lines += [f"      - model: <<{model}>>", f"        layer_range: [{start}, {end}]"]
            if source_parameters:
                lines.append(f"        parameters: {source_parameters}")
        if parameters:
            lines.append(f"    parameters: {parameters}")
    return "\n".join(lines) + "\n"


def mergekit_test_cases() -> list[Case]:
    """tests/test_basic_merges.py, test_tokenizer.py and test_chat_template.py of mergekit's repository."""
    cases = [
        Case("basic-passthrough", "merge_method: passthrough\n" + _models(("a", None)) + "dtype: bfloat16\n"),
        Case("basic-passthrough-scale", "merge_method: passthrough\n" + _models(
            ("a", "{scale: [{filter: o_proj, value: 0}, {value: 1}]}")) + "dtype: bfloat16\n"),
        Case("basic-linear", _two("linear")),
        Case("basic-slerp", _two("slerp", "a", "{t: 0.35}")),
        Case("basic-task-arithmetic", _two("task_arithmetic", "c")),
        Case("basic-breadcrumbs", _two("breadcrumbs", "c")),
        Case("basic-ties", _two("ties", "c", "{density: 0.3}")),
        Case("basic-sce", _two("sce", "c", "{select_topk: 0.5}")),
        Case("basic-ram", _two("ram", "c")),
        Case("basic-ramplus-tl", _two("ramplus_tl", "c", "{r: 0.05, alpha: 1.0}")),
        Case("basic-multislerp", _two("multislerp", "c")),
        Case("basic-dare-ties", _two("dare_ties", "c", "{density: 0.66}"), RANDOM, seed=1),
        Case("basic-model-stock", _two("model_stock", "a", a="b", b="c")),
        Case("basic-model-stock-filter-wise", _two("model_stock", "a", "{filter_wise: true}", a="b", b="c")),
        Case("basic-arcee-fusion", _two("arcee_fusion", "a")),
        Case("basic-nearswap", _two("nearswap", "a", "{t: 0.0001}")),
        Case("basic-della", _two("della", "c", "{density: 0.66, epsilon: 0.05, lambda: 0.5}"), RANDOM, seed=1),
        Case("basic-della-invalid-epsilon", _two("della", "c", "{density: 0.66, epsilon: 1.35, lambda: 0.5}"),
             BOTH_FAIL, mtool_error="density +/- epsilon"),
        Case("basic-karcher", _two("karcher", "c", "{max_iter: 5, tol: 1.0e-5}")),
        Case("basic-gpt2-copy", "merge_method: passthrough\n" + _models(("gpt2", None)) + "dtype: bfloat16\n"),
        Case("basic-gpt2-stack", _slices(([("gpt2", 0, 2, None)], None), ([("gpt2", 0, 2, None)], None)) +
             "merge_method: passthrough\ndtype: bfloat16\n"),
        Case("basic-granite-copy", "merge_method: passthrough\n" + _models(("granite_a", None)) + "dtype: bfloat16\n"),
        Case("basic-granite-linear", _two("linear", a="granite_a", b="granite_b")),
        Case("basic-granite-slerp", _two("slerp", "granite_a", "{t: 0.5}", a="granite_a", b="granite_b")),
    ]
    for base in (None, "c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                params = f"{{nuslerp_row_wise: {str(row_wise).lower()}, nuslerp_flatten: {str(flatten).lower()}}}"
                cases.append(Case(f"basic-nuslerp-{base or 'nobase'}-{int(row_wise)}{int(flatten)}",
                                  _two("nuslerp", base, params)))
    cases.append(Case("basic-nuslerp-opposite-weights", "merge_method: nuslerp\n" + _models(
        ("a", "{weight: -0.5}"), ("b", "{weight: 0.5}")) + "base_model: <<c>>\ndtype: bfloat16\n"
        "parameters: {nuslerp_row_wise: false, nuslerp_flatten: false}\n"))
    tokenizer_models = _models(("tok_base", "{weight: 1.0}"), ("tok_padded", "{weight: 1.0}"),
                               ("tok_chatml", "{weight: 1.0}")) + "base_model: <<tok_base>>\ndtype: float32\n"
    pair = _models(("tok_base", "{weight: 0.5}"), ("tok_padded", "{weight: 0.5}")) + \
        "base_model: <<tok_base>>\ndtype: bfloat16\n"
    cases += [
        Case("tokenizer-legacy", "merge_method: linear\n" + tokenizer_models, BOTH_FAIL, tokenizer=True,
             mtool_error="shape mismatch"),
        Case("tokenizer-source-base", "merge_method: linear\n" + tokenizer_models + "tokenizer_source: base\n",
             tokenizer=True),
        Case("tokenizer-source-union", "merge_method: linear\n" + tokenizer_models + "tokenizer_source: union\n",
             tokenizer=True),
        Case("tokenizer-source-model", "merge_method: linear\n" + tokenizer_models +
             "tokenizer_source: <<tok_chatml>>\n", tokenizer=True),
        Case("tokenizer-slerp-union", "merge_method: slerp\n" + _models(("tok_base", None), ("tok_chatml", None)) +
             "base_model: <<tok_base>>\ntokenizer_source: union\nparameters: {t: 0.5}\ndtype: float32\n",
             tokenizer=True),
        Case("tokenizer-force-token", "merge_method: linear\n" + tokenizer_models +
             "tokenizer:\n  source: union\n  tokens:\n    _tok_10: {source: <<tok_chatml>>, force: true}\n"
             "    _tok_11: {source: <<tok_base>>, force: true}\n", tokenizer=True),
        Case("tokenizer-model-token-id", "merge_method: linear\n" + tokenizer_models +
             "tokenizer:\n  source: union\n  tokens:\n    _tok_20:\n      source: {kind: model_token, model: "
             "<<tok_chatml>>, token_id: 64}\n      force: true\n    _tok_21:\n      source: {kind: model_token, "
             "model: <<tok_base>>, token: <s>}\n      force: true\n", tokenizer=True),
        Case("tokenizer-pad-to-multiple", "merge_method: linear\n" + _models(("tok_chatml", "{weight: 1.0}")) +
             "base_model: <<tok_chatml>>\ntokenizer: {source: base, pad_to_multiple_of: 16}\ndtype: float32\n",
             tokenizer=True),
        Case("chat-template-chatml", "merge_method: linear\n" + pair + "chat_template: chatml\n", tokenizer=True,
             builtin_template=True),
        Case("chat-template-literal", "merge_method: linear\n" + pair +
             "chat_template: \"{{messages[0]['content']}}\"\n", tokenizer=True),
    ]
    return cases


def mergekit_example_cases() -> list[Case]:
    """examples/*.yml of mergekit's repository (and the multi-stage examples/mega.yml of its history)."""
    gradient = ("  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
                "      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n")
    pair = _slices(([("ft1", 0, 3, None), ("ft2", 0, 3, None)], None))
    return [
        Case("example-arcee-fusion", "merge_method: arcee_fusion\n" + _models(("ft1", None), ("ft2", None)) +
             "base_model: <<ft1>>\ndtype: bfloat16\n"),
        Case("example-bio-merge", "merge_method: ties\n" + _models(("ft1", "{density: 0.5, weight: 0.5}"),
             ("ft2", "{density: 0.5, weight: 0.5}")) + "base_model: <<base>>\nparameters:\n  normalize: false\n"
             "  int8_mask: true\ndtype: float16\n"),
        Case("example-gradient-slerp", pair + "merge_method: slerp\nbase_model: <<ft1>>\nparameters:\n" + gradient +
             "dtype: float16\n"),
        Case("example-linear", "merge_method: linear\n" + _models(("ft1", "{weight: 1.0}"), ("ft2", "{weight: 0.3}"),
             ("ft3", "{weight: 0.5}")) + "dtype: float16\n"),
        Case("example-orcamini-platy", _slices(([("ft1", 0, 2, None)], None), ([("ft2", 1, 3, None)], None)) +
             "merge_method: passthrough\ndtype: float16\n"),
        Case("example-ties", "merge_method: ties\nbase_model: <<base>>\n" + _models(
            ("ft1", "{density: [1, 0.7, 0.1], weight: 1.0}"), ("ft2", "{density: 0.5, weight: [0, 0.3, 0.7, 1]}"),
            ("ft3", "{density: 0.33, weight: [{filter: mlp, value: 0.5}, {value: 0}]}")) +
            "parameters:\n  normalize: true\n  int8_mask: true\ndtype: float16\n"),
        Case("example-mega", "name: gradient-slerp\n" + pair + "merge_method: slerp\nbase_model: <<ft1>>\n"
             "parameters:\n" + gradient + "dtype: bfloat16\n---\nmerge_method: ties\nbase_model: <<base>>\n"
             "models:\n  - model: gradient-slerp\n    parameters: {density: 0.5, weight: 0.6}\n"
             "  - model: <<ft3>>\n    parameters: {density: 0.4, weight: 0.4}\ndtype: bfloat16\n"),
    ]


def mtool_recipe_cases() -> list[Case]:
    """recipes/merge: the Hub models replaced by tiny bfloat16 ones (Mistral-7B-v0.1 -> base, the fine-tunes
    -> ft1..ft3; a +adapter reference -> a tiny LoRA)."""
    hub = {"mistralai/Mistral-7B-v0.1": "<<base>>", "teknium/OpenHermes-2.5-Mistral-7B": "<<ft1>>",
           "HuggingFaceH4/zephyr-7b-beta": "<<ft2>>", "Intel/neural-chat-7b-v3-1": "<<ft3>>",
           "./my-adapter": "<<lora>>"}
    layers = {"[0, 24]": "[0, 2]", "[8, 32]": "[1, 3]"}  # a 32-layer model's ranges on 3 layers
    cases = []
    for path in sorted(RECIPES.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        for name, placeholder in {**hub, **layers}.items():
            text = text.replace(name, placeholder)
        random = any(word in path.stem for word in ("dare", "della"))
        cases.append(Case(f"recipe-{path.stem}", text, RANDOM if random else EQUAL, seed=1 if random else None,
                          tokenizer="tokenizer" in path.stem, builtin_template="chat_template: chatml" in text))
    return cases


GRADIENT = "[{filter: self_attn, value: [0.2, 0.9, 0.4]}, {filter: mlp, value: [1.0, 0.3]}, {value: 0.5}]"


def method_cases(family: str) -> list[Case]:
    """Every method with gradients, filters and slices, on the ``family`` models (b16: bfloat16 low-rank
    fine-tunes with many equal magnitudes in their task vectors, f32: float32 fine-tunes)."""
    b, f1, f2, f3 = (f"{name}_{family}" for name in ("base", "ft1", "ft2", "ft3"))
    stacked = _slices(
        ([(b, 0, 2, None), (f1, 1, 3, f"{{weight: {GRADIENT}}}"), (f2, 0, 2, "{weight: 0.3, density: 0.6}")],
         "{density: 0.5}"),
        ([(b, 2, 3, None), (f1, 0, 1, "{weight: 0.7}"), (f2, 2, 3, "{weight: 0.5}")], None))
    weighted = _models((f1, f"{{weight: {GRADIENT}, density: 0.5}}"), (f2, "{weight: 0.4, density: [0.3, 0.9]}"),
                       (f3, "{weight: 0.3, density: 0.7}"))
    dense = weighted.replace("density: 0.5}", "density: 1.0}").replace("density: [0.3, 0.9]", "density: 1.0") \
        .replace("density: 0.7", "density: 1.0")
    on_base = f"base_model: <<{b}>>\n"
    cases = [
        Case(f"{family}-linear", "merge_method: linear\n" + _models((f1, f"{{weight: {GRADIENT}}}"),
             (f2, "{weight: 0.3}"), (f3, "{weight: [0.1, 0.6]}"))),
        Case(f"{family}-linear-slices", stacked.replace(", density: 0.6", "").replace(
            "    parameters: {density: 0.5}\n", "") +
            "merge_method: linear\nparameters: {normalize: false, weight: 1}\n"),
        Case(f"{family}-slerp", "merge_method: slerp\n" + on_base + _models((b, None), (f1, None)) +
             f"parameters:\n  t: {GRADIENT}\n"),
        Case(f"{family}-slerp-slices", _slices(([(b, 0, 2, None), (f1, 1, 3, None)], "{t: [0.1, 0.8]}"),
                                               ([(b, 2, 3, None), (f2, 2, 3, None)], "{t: 0.6}")) +
             "merge_method: slerp\n" + on_base),
        Case(f"{family}-nuslerp", "merge_method: nuslerp\n" + on_base + _models((f1, "{weight: [0.2, 0.8]}"),
             (f2, "{weight: 0.6}")) + "parameters: {nuslerp_flatten: false}\n"),
        Case(f"{family}-multislerp", "merge_method: multislerp\n" + on_base + _models(
            (f1, "{weight: 1.0}"), (f2, "{weight: [2.0, 0.5]}"), (f3, "{weight: 3.0}"))),
        Case(f"{family}-karcher", "merge_method: karcher\n" + _models((f1, None), (f2, None), (f3, None)) +
             "parameters: {max_iter: 20, tol: 1.0e-6}\n"),
        Case(f"{family}-model-stock", "merge_method: model_stock\n" + on_base + _models((f1, None), (f2, None),
             (f3, None)) + "parameters: {filter_wise: [{filter: mlp, value: true}, {value: false}]}\n"),
        Case(f"{family}-nearswap", "merge_method: nearswap\n" + on_base + _models((b, None), (f1, None)) +
             "parameters: {t: [0.0005, 0.01]}\n"),
        Case(f"{family}-sce", "merge_method: sce\n" + on_base + _models((f1, None), (f2, None), (f3, None)) +
             "parameters: {select_topk: [0.3, 0.8]}\n"),
        Case(f"{family}-ram", "merge_method: ram\n" + on_base + _models((f1, None), (f2, None), (f3, None)) +
             "parameters: {epsilon: 0.002}\n"),
        Case(f"{family}-ramplus-tl", "merge_method: ramplus_tl\n" + on_base + _models((f1, None), (f2, None)) +
             "parameters: {r: 0.2, alpha: 0.5, epsilon: 0.002}\n"),
        Case(f"{family}-arcee-fusion", "merge_method: arcee_fusion\n" + on_base + _models((b, None), (f1, None))),
    ]
    for method, extra, deterministic in (("task_arithmetic", "{lambda: 0.8}", weighted),
                                         ("ties", "{normalize: true}", weighted),
                                         ("ties", "{rescale: true, lambda: 1.2}", weighted),
                                         ("breadcrumbs", "{gamma: 0.05}", weighted),
                                         ("breadcrumbs_ties", "{gamma: [0.0, 0.2]}", weighted),
                                         ("dare_ties", "{normalize: true}", dense),
                                         ("dare_linear", "{lambda: 0.9}", dense),
                                         ("della", "{epsilon: 0.1}", dense), ("della_linear", "{epsilon: 0.1}", dense)):
        label = f"{family}-{method.replace('_', '-')}" + ("-rescale" if "rescale" in extra else "")
        cases.append(Case(label, f"merge_method: {method}\n" + on_base + deterministic + f"parameters: {extra}\n"))
        if deterministic is weighted:
            cases.append(Case(label + "-slices", stacked + f"merge_method: {method}\n" + on_base +
                              f"parameters: {extra}\n"))
    for method in ("dare_ties", "dare_linear", "della", "della_linear"):
        cases.append(Case(f"{family}-{method.replace('_', '-')}-random", f"merge_method: {method}\n" + on_base +
                          _models((f1, "{weight: 0.6, density: 0.5}"), (f2, "{weight: 0.4, density: 0.6}")),
                          RANDOM, seed=3))
    return cases


ALL_CASES = mergekit_test_cases() + mergekit_example_cases() + mtool_recipe_cases() + method_cases("b16") + \
    method_cases("f32")


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parity-models")
    found = {
        "a": pico_llama(root / "a", seed=1), "b": pico_llama(root / "b", seed=2), "c": pico_llama(root / "c", seed=3),
        "tok_base": pico_llama(root / "tok-base", seed=4),
        "tok_chatml": pico_llama(root / "tok-chatml", vocab_size=66, added_tokens=("<|im_start|>", "<|im_end|>"),
                                 seed=5),
        "tok_padded": pico_llama(root / "tok-padded", added_tokens=tuple(f"<UNUSED_{i}>" for i in range(4)), seed=6),
        "gpt2": tiny.model("gpt2"), "granite_a": tiny.model("granite", seed=1),
        "granite_b": tiny.model("granite", seed=2),
    }
    base16 = tiny.model("llama", num_layers=3, dtype=torch.bfloat16)
    found["base_b16"] = found["base"] = base16
    for index in (1, 2, 3):
        found[f"ft{index}_b16"] = found[f"ft{index}"] = low_rank_finetune(base16, root / f"ft{index}-b16", seed=index)
    base32 = tiny.model("llama", num_layers=3)
    found["base_f32"] = base32
    for index in (1, 2, 3):
        found[f"ft{index}_f32"] = tiny.finetune(base32, seed=index)
    found["lora"] = tiny.lora(base16, rank=4)
    return {key: str(Path(value).resolve()) for key, value in found.items()}


@pytest.fixture(scope="module")
def outputs(models, tmp_path_factory) -> Path:
    """Every case through both tools: ``<case>/mtool``, ``<case>/mergekit`` (or ``.error`` files)."""
    if mergekit_python() is None:
        pytest.skip(SKIP_REASON)
    work = tmp_path_factory.mktemp("parity")
    jobs = []
    for case in ALL_CASES:
        folder = work / case.name
        folder.mkdir()
        text = case.text(models)
        (folder / "recipe.yaml").write_text(text, encoding="utf-8")
        try:
            if is_multi_stage(text):
                run_stages(parse_stages(text, source=case.name), folder / "mtool", MergeOptions(seed=case.seed or 0))
            else:
                plan = build_plan(parse_recipe(text, source=case.name))
                execute(plan, folder / "mtool", MergeOptions(seed=case.seed or 0, write_card=False))
        except Exception as error:  # the case decides whether an error is expected
            (folder / "mtool.error").write_text(f"{type(error).__name__}: {error}", encoding="utf-8")
        jobs.append({"recipe": folder / "recipe.yaml", "out": folder / "mergekit", "seed": case.seed,
                     "kind": "multi" if is_multi_stage(text) else "merge"})
    run_mergekit(jobs, work=work)
    return work


def _mtool_error(folder: Path) -> str | None:
    marker = folder / "mtool.error"
    return marker.read_text(encoding="utf-8") if marker.is_file() else None


@pytest.mark.mergekit
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.name)
def test_same_model_as_mergekit(outputs: Path, case: Case) -> None:
    folder = outputs / case.name
    ours, theirs = folder / "mtool", folder / "mergekit"
    theirs_error, ours_error = mergekit_error(theirs), _mtool_error(folder)
    if case.expect == BOTH_FAIL:
        assert theirs_error, "mergekit was expected to refuse this recipe"
        assert ours_error and case.mtool_error in ours_error, ours_error
        return
    assert ours_error is None, ours_error
    assert theirs_error is None, theirs_error
    if case.expect == RANDOM:
        mine, reference = load_tensors(ours), load_tensors(theirs)
        assert {n: (t.shape, t.dtype) for n, t in mine.items()} == {n: (t.shape, t.dtype) for n, t in reference.items()}
        assert all(torch.isfinite(t.float()).all() for t in mine.values())
    else:
        assert model_differences(ours, theirs) == []
    assert config_differences(ours, theirs) == []
    if case.tokenizer:
        differences = tokenizer_differences(ours, theirs)
        if case.builtin_template:  # documented: mtool's built-in templates are its own (a warning says so)
            assert differences == ["chat templates differ"]
            assert _rendered(ours).split() == _rendered(theirs).split()
        else:
            assert differences == []


def _rendered(folder: Path) -> str:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)


@pytest.mark.mergekit
def test_every_method_is_exercised() -> None:
    from mtool.merger.methods import METHODS

    used = {match for case in ALL_CASES for match in re.findall(r"merge_method: (\w+)", case.recipe)}
    assert used == set(METHODS)


def test_a_case_that_differs_is_caught(models, tmp_path) -> None:
    """The comparison is not vacuous: a gradient evaluated at t = 1 after the layers (mtool's opt-in) gives another
    lm_head and final norm than the same recipe evaluated as mergekit does."""
    text = Case("slerp-gradient", "merge_method: slerp\nbase_model: <<base>>\n" + _models(("base", None), ("ft1", None))
                + "parameters: {t: [0.1, 0.9]}\n").text(models)
    execute(build_plan(parse_recipe(text)), tmp_path / "default", MergeOptions(write_card=False))
    text += "mtool:\n  post_layer_t: 1\n"
    execute(build_plan(parse_recipe(text)), tmp_path / "top", MergeOptions(write_card=False))
    differing = {line.split(":")[0] for line in model_differences(tmp_path / "top", tmp_path / "default")}
    assert differing == {"lm_head.weight", "model.norm.weight"}
    record = json.loads((tmp_path / "top" / "mtool-lineage.json").read_text())
    assert record["recipe"]["mtool"] == {"post_layer_t": 1} and record["parameters"]["mtool_settings"]
    shutil.rmtree(tmp_path / "top")
