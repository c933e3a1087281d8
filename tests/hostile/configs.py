"""Hostile configs: PEFT adapter configs (``mtool adapters merge``) and mergekit recipes (``mtool merge``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.hostile.cases import Case, Env, Run, copy_adapter, safetensors_bytes, tensor, write_text

# -- adapter configs: name -> changes to the shared adapter's adapter_config.json (... removes a key) ----------------

ADAPTER_CHANGES: dict[str, dict[str, Any]] = {
    "lora-alpha-null": {"lora_alpha": None},
    "lora-alpha-word": {"lora_alpha": "eight"},
    "lora-alpha-infinite": {"lora_alpha": float("inf")},
    "lora-alpha-nan": {"lora_alpha": float("nan")},
    "lora-alpha-list": {"lora_alpha": [8]},
    "alpha-pattern-all": {"alpha_pattern": "all"},
    "alpha-pattern-word-value": {"alpha_pattern": {"q_proj": "sixteen"}},
    "r-1e30": {"r": 1e30},
    "r-8-for-rank-4-tensors": {"r": 8},
    "r-zero": {"r": 0},
    "r-negative": {"r": -4},
    "r-string": {"r": "4"},
    "r-true": {"r": True},
    "r-float": {"r": 4.0},
    "rank-pattern-1000": {"rank_pattern": {"q_proj": 1000}},
    "rank-pattern-bad-regex": {"rank_pattern": {"q_proj(": 4}},
    "rank-pattern-list": {"rank_pattern": [["q_proj", 4]]},
    "rank-pattern-zero": {"rank_pattern": {"v_proj": 0}},
    "use-dora-without-magnitudes": {"use_dora": True},
    "use-dora-word": {"use_dora": "yes"},
    "use-rslora-number": {"use_rslora": 2},
    "fan-in-fan-out-string": {"fan_in_fan_out": "false"},
    "peft-type-ia3": {"peft_type": "IA3"},
    "peft-type-missing": {"peft_type": ...},
    "peft-type-number": {"peft_type": 7},
    "target-modules-number": {"target_modules": 5},
    "modules-to-save-string": {"modules_to_save": "lm_head"},
    "token-indices-string": {"trainable_token_indices": "1,2,3"},
    "token-indices-negative": {"trainable_token_indices": [-1]},
    "base-model-number": {"base_model_name_or_path": 42},
    "base-model-lone-surrogate": {"base_model_name_or_path": "\ud800"},
    "activated-lora": {"use_alora": True},
    "layer-replication": {"layer_replication": [[0, 1]]},
}


def _adapter_case(name: str, changes: dict[str, Any]) -> Case:
    def build(env: Env) -> Run:
        adapter = copy_adapter(env, env.root / "adapter", **changes)
        where = str(adapter) if name in ("r-8-for-rank-4-tensors", "rank-pattern-1000", "use-dora-without-magnitudes") \
            else str(adapter / "adapter_config.json")
        return Run(["adapters", "merge", str(env.base), str(adapter), str(env.out)], inputs=[adapter, env.base],
                   output=env.out, where=where)
    return Case("adapter-config", name, build)


def _whole_config(name: str, text: str | bytes, where_line: int | None = None) -> Case:
    def build(env: Env) -> Run:
        adapter = copy_adapter(env, env.root / "adapter")
        path = write_text(adapter / "adapter_config.json", text)
        where = f"{path}, line {where_line}" if where_line else str(path)
        return Run(["adapters", "merge", str(env.base), str(adapter), str(env.out)], inputs=[adapter, env.base],
                   output=env.out, where=where)
    return Case("adapter-config", name, build)


def _missing_config(env: Env) -> Run:
    adapter = copy_adapter(env, env.root / "adapter")
    (adapter / "adapter_config.json").unlink()
    return Run(["adapters", "merge", str(env.base), str(adapter), str(env.out)], inputs=[adapter, env.base],
               output=env.out, where=str(adapter))


def _foreign_tensor_names(env: Env) -> Run:
    adapter = copy_adapter(env, env.root / "adapter")
    write_text(adapter / "adapter_model.safetensors", safetensors_bytes({"model.q_proj.lora_A": tensor()}, b"\0" * 8))
    return Run(["adapters", "merge", str(env.base), str(adapter), str(env.out)], inputs=[adapter, env.base],
               output=env.out, where=str(adapter))


ADAPTER_CASES = (
    [_adapter_case(name, changes) for name, changes in ADAPTER_CHANGES.items()]
    + [_whole_config("config-is-a-list", json.dumps([{"r": 4}])),
       _whole_config("config-is-a-string", json.dumps("LORA")),
       _whole_config("config-not-json", '{"r": 4,\n "lora_alpha": }', where_line=2),
       _whole_config("config-not-utf8", b'{"peft_type": "LORA\xff"}', where_line=1),
       Case("adapter-config", "config-missing", _missing_config),
       Case("adapter-config", "tensor-names-not-peft", _foreign_tensor_names)]
)

# -- recipes: name -> (recipe text or bytes with {base} for the tiny model, the line the error must name) ------------

ALIAS_BOMB = "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))
RECIPES: dict[str, tuple[str | bytes, int | None]] = {
    "alias-bomb-under-model": ('a: &a ["{base}", "{base}", "{base}", "{base}", "{base}", "{base}", "{base}", "{base}", '
                               '"{base}"]\n' + ALIAS_BOMB + "merge_method: linear\nmodels:\n  - model: *j\n", 5),
    "recursive-alias": ("merge_method: linear\nmodels: &m\n  - model: {base}\n  - model: *m\n", 4),
    "undefined-alias": ("merge_method: linear\nmodels:\n  - model: *nowhere\n", 3),
    "duplicate-merge-method": ("merge_method: linear\nmerge_method: ties\nmodels:\n  - model: {base}\n", 2),
    "duplicate-nested-key": ("merge_method: linear\nmodels:\n  - model: {base}\n    parameters:\n      weight: 1\n"
                             "      weight: 2\n", 6),
    "non-utf8-byte": (b"merge_method: linear\nmodels:\n  - model: caf\xe9\n", 3),
    "nul-character": ("merge_method: linear\x00\nmodels: []\n", 1),
    "tab-indentation": ("merge_method: linear\nmodels:\n\t- model: {base}\n", 3),
    "nested-brackets-100000": ("merge_method: " + "[" * 100_000 + "]" * 100_000 + "\n", 1),
    "mapping-nesting-100": ("merge_method: linear\nparameters: " + "{a: " * 100 + "1" + "}" * 100 + "\n", 2),
    "models-15000": ("merge_method: linear\nmodels:\n" + "".join(f"  - model: m{i}\n" for i in range(15_000)), None),
    "models-110000": ("merge_method: linear\nmodels:\n" + "".join(f"  - model: m{i}\n" for i in range(110_000)), None),
    "path-5000-chars": ("merge_method: linear\nmodels:\n  - model: /" + "a" * 5000 + "\n", 3),
    "path-100k-chars": ("merge_method: linear\nmodels:\n  - model: /" + "a" * 100_000 + "\n", 3),
    "path-10MB": ("merge_method: linear\nmodels:\n  - model: /" + "a" * 10_000_000 + "\n", None),
    "path-with-nul": ('merge_method: linear\nmodels:\n  - model: "{base}\\0evil"\n', 3),
    "integer-10000-digits": ("merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {weight: "
                             + "1" * 10_000 + "}\n", 4),
    "impossible-date": ("merge_method: linear\nname: 2024-13-45\nmodels:\n  - model: {base}\n", 2),
    "python-object-tag": ("merge_method: !!python/object/apply:os.system ['touch /tmp/pwned']\nmodels: []\n", 1),
    # several documents are stages of a multi-stage recipe (mergekit-multi): the first invalid one is named
    "two-documents": ("merge_method: linear\n---\nmerge_method: ties\n", 1),
    "two-documents-second-bad": ("merge_method: linear\nmodels:\n  - model: {base}\n---\nmerge_method: ties\n"
                                 "models: 7\n", 6),
    "top-level-list": ("- merge_method: linear\n", None),
    "empty-file": ("", None),
    "only-a-comment": ("# nothing here\n", None),
    "merge-method-unknown": ("merge_method: blend\nmodels:\n  - model: {base}\n", None),
    "merge-method-list": ("merge_method: [linear]\nmodels:\n  - model: {base}\n", 1),
    "models-is-a-string": ("merge_method: linear\nmodels: {base}\n", 2),
    "model-entry-is-number": ("merge_method: linear\nmodels:\n  - 5\n", 3),
    "model-path-is-number": ("merge_method: linear\nmodels:\n  - model: {path: 5}\n", 3),
    "model-missing": ("merge_method: linear\nmodels:\n  - model: /nowhere/at/all\n  - model: {base}\n", None),
    "weight-is-a-word": ("merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {weight: heavy}\n"
                         "  - model: {other}\n", None),
    "layer-range-reversed": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n"
                             "        layer_range: [2, 0]\n", 5),
    "tokenizer-source-empty": ("merge_method: linear\nmodels:\n  - model: {base}\ntokenizer_source: ''\n", 4),
    "base-model-number": ("merge_method: ties\nbase_model: 42\nmodels:\n  - model: {base}\n", 2),
    "dtype-unknown": ("merge_method: linear\ndtype: float128\nmodels:\n  - model: {base}\n", None),
    "slerp-t-nan": ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {other}\n"
                    "parameters: {t: .nan}\n", None),
    "unknown-top-level-key": ("merge_method: linear\nmodles:\n  - model: {base}\n", 2),
    "scalar-70k-chars": ("merge_method: linear\nchat_template: '" + "x" * 70_000 + "'\nmodels:\n  - model: {base}\n",
                         2),
}


def _recipe_case(name: str, text: str | bytes, line: int | None) -> Case:
    def build(env: Env) -> Run:
        other = env.root / "other"
        if isinstance(text, str) and "{other}" in text:  # a second model: the base's files under another name
            shutil.copytree(env.base, other)
        body = text.replace("{base}", str(env.base)).replace("{other}", str(other)) if isinstance(text, str) else text
        recipe = write_text(env.root / "recipe.yaml", body)
        where = f"{recipe}, line {line}" if line else str(recipe)
        if name == "dtype-unknown":
            where = "dtype"
        elif name in ("model-missing",):
            where = "/nowhere/at/all"
        elif name in ("merge-method-unknown", "weight-is-a-word", "slerp-t-nan"):
            where = ""  # named by key or tensor, not by line (checked: the line names the key)
        return Run(["merge", str(recipe), str(env.out)], inputs=[recipe, env.base, other], output=env.out, where=where)
    return Case("recipe", name, build)


def _recipe_is_dev_zero(env: Env) -> Run:
    return Run(["merge", "/dev/zero", str(env.out)], inputs=[Path("/dev/zero")], output=env.out, where="/dev/zero")


RECIPE_CASES = [_recipe_case(name, text, line) for name, (text, line) in RECIPES.items()] + \
    [Case("recipe", "recipe-file-is-dev-zero", _recipe_is_dev_zero)]

CASES: list[Case] = ADAPTER_CASES + RECIPE_CASES
