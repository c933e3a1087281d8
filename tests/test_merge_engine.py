"""mtool merge end to end: determinism, layer slicing, vocabularies, adapters, shards, lineage, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtool.io.reading import open_checkpoint
from mtool.lineage import read_lineage
from mtool.merger.plan import build_plan
from mtool.merger.recipe import parse_recipe
from mtool.merger.run import MergeOptions, execute


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(folder)
    return {name: checkpoint.read(name) for name in checkpoint.names}


@pytest.fixture(scope="module")
def trio(tiny):
    base = tiny.model("llama")
    return base, tiny.finetune(base, seed=1), tiny.finetune(base, seed=2)


def _dare(trio) -> str:
    base, ft1, ft2 = trio
    return (f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: "
            f"{{weight: 0.6, density: 0.4}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.6}}\n")


def test_random_merges_are_reproducible_and_independent_of_order(trio, tmp_path, run_cli) -> None:
    recipe = _write(tmp_path, _dare(trio))
    run_cli("-q", "merge", recipe, tmp_path / "a", "--seed", "7")
    run_cli("-q", "merge", recipe, tmp_path / "b", "--seed", "7")
    run_cli("-q", "merge", recipe, tmp_path / "c", "--seed", "8")
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    assert a != (tmp_path / "c" / "model.safetensors").read_bytes()
    plan = build_plan(parse_recipe(recipe.read_text()))
    plan.tensors.reverse()  # compute (and lay out) the tensors in the opposite order
    execute(plan, tmp_path / "reversed", MergeOptions(seed=7, write_card=False))
    forward, backward = _tensors(tmp_path / "a"), _tensors(tmp_path / "reversed")
    assert forward.keys() == backward.keys()
    for name in forward:
        assert torch.equal(forward[name], backward[name]), name
    record = read_lineage(tmp_path / "a")
    assert record.operation == "merge" and record.method == "dare_ties" and record.seed == 7
    assert [p.role for p in record.parents] == ["base", "model", "model"]
    assert all(len(digest) == 64 for p in record.parents for digest in p.files.values())
    assert set(record.outputs) == {"model.safetensors"}


def test_slices_stack_layers_into_a_model_transformers_loads(trio, tmp_path, run_cli) -> None:
    from transformers import AutoModelForCausalLM

    base, ft1, _ = trio
    recipe = _write(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {ft1}, layer_range: [1, 2]}}]
dtype: float32
""")
    out = tmp_path / "franken"
    run_cli("-q", "merge", recipe, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    merged, base_t, ft_t = _tensors(out), _tensors(base), _tensors(ft1)
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], ft_t["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], base_t["model.layers.1.mlp.up_proj.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_dry_run_prints_the_plan_and_writes_nothing(trio, tmp_path, run_cli) -> None:
    recipe = _write(tmp_path, _dare(trio))
    output = run_cli("merge", recipe, tmp_path / "never", "--dry-run").output
    assert "layer 1:" in output and "model.layers.1.mlp.up_proj.weight" in output
    assert "density=0.4" in output and "estimated peak working memory" in output
    assert not (tmp_path / "never").exists()


def test_adapter_reference_applies_the_lora_like_peft(tiny, tmp_path, run_cli) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny.model("llama")
    adapter = tiny.lora(base, rank=4, alpha=8)
    recipe = _write(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\ndtype: float32\n")
    run_cli("-q", "merge", recipe, tmp_path / "merged")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    expected = reference.state_dict()
    merged = _tensors(tmp_path / "merged")
    for name, value in merged.items():
        error = (value - expected[name]).abs().max() / expected[name].abs().max()
        assert error <= 1e-6, name
    assert [p.role for p in read_lineage(tmp_path / "merged").parents] == ["model", "adapter"]


def test_sharded_inputs_and_outputs(tiny, tmp_path, run_cli) -> None:
    from transformers import AutoModelForCausalLM

    base = tiny.model("qwen2", shards=3)
    other = tiny.finetune(base, seed=4, shards=2)
    recipe = _write(tmp_path, f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                              f"  - model: {other}\nparameters: {{t: 0.5}}\n")
    run_cli("-q", "merge", recipe, tmp_path / "out", "--shard-size", "40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "qwen2"
    record = read_lineage(tmp_path / "out")
    assert len(record.outputs) == len(set(index["weight_map"].values()))
    for parent, folder in zip(record.parents, (base, other)):
        assert parent.files == {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                                for f in sorted(folder.glob("*.safetensors"))}


def test_merge_starts_hashing_its_inputs_before_planning(trio, tmp_path, monkeypatch, run_cli) -> None:
    import mtool.merger.plan as plan_module
    from mtool.io.hashing import FileHasher

    events = []
    start_hashing, plan = FileHasher.start, plan_module.build_plan
    monkeypatch.setattr(FileHasher, "start", lambda self, files: events.append("hash") or start_hashing(self, files))
    monkeypatch.setattr(plan_module, "build_plan",
                        lambda recipe, **options: events.append("plan") or plan(recipe, **options))
    recipe = _write(tmp_path, _dare(trio))
    run_cli("-q", "merge", recipe, tmp_path / "out", "--no-card")
    run_cli("-q", "merge", recipe, "--dry-run")  # a dry run reads nothing
    assert events == ["hash", "plan", "plan"]


def test_input_hashing_skips_what_it_cannot_find(trio, tmp_path) -> None:
    from mtool.merger.recipe import local_weight_files

    base, ft1, _ = trio
    recipe = parse_recipe(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
                          f"    parameters: {{weight: 1.0}}\n  - model: {tmp_path / 'missing'}\n"
                          f"    parameters: {{weight: 1.0}}\n")
    assert sorted(local_weight_files(recipe)) == sorted(f for folder in (base, ft1)
                                                        for f in folder.glob("*.safetensors"))


def test_union_vocabulary_aligns_embedding_rows(tiny, tmp_path, run_cli) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny.model("llama")
    extended = tmp_path / "extended"
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<tool>", "<call>"])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-2:] = torch.randn(2, 64)
    model.save_pretrained(extended)
    tokenizer.save_pretrained(extended)
    recipe = _write(tmp_path, f"merge_method: linear\nbase_model: {base}\nmodels:\n"
                              f"  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                              f"  - model: {extended}\n    parameters: {{weight: 0.5}}\n"
                              f"tokenizer_source: union\ndtype: float32\n")
    out = tmp_path / "union"
    run_cli("-q", "merge", recipe, out)
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(merged_tokenizer) == len(tokenizer)
    embed = _tensors(out)["model.embed_tokens.weight"]
    base_embed = _tensors(base)["model.embed_tokens.weight"]
    ext_embed = _tensors(extended)["model.embed_tokens.weight"]
    new_id = merged_tokenizer.convert_tokens_to_ids("<tool>")
    assert embed.shape[0] == len(tokenizer)
    torch.testing.assert_close(embed[5], 0.5 * base_embed[5] + 0.5 * ext_embed[5])
    # mergekit's fill: only the extended model has <tool>, so every input carries its row
    torch.testing.assert_close(embed[new_id], ext_embed[new_id])
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(tokenizer)
    # mtool's fill (opt-in): the base lacks <tool> and contributes the mean of its rows
    recipe.write_text(recipe.read_text() + "mtool:\n  vocabulary_fill: base\n")
    run_cli("-q", "merge", recipe, tmp_path / "union-base-fill")
    embed = _tensors(tmp_path / "union-base-fill")["model.embed_tokens.weight"]
    torch.testing.assert_close(embed[new_id], 0.5 * base_embed.mean(0) + 0.5 * ext_embed[new_id])


def test_different_vocabularies_without_tokenizer_source_are_refused(tiny, tmp_path, run_cli) -> None:
    small = tiny.model("llama")
    large = tiny.model("llama", vocab_size=400)
    recipe = _write(tmp_path, f"merge_method: linear\nmodels:\n  - model: {small}\n    parameters: {{weight: 1}}\n"
                              f"  - model: {large}\n    parameters: {{weight: 1}}\n")
    result = run_cli("merge", recipe, tmp_path / "out", expect=2)
    assert "shape mismatch for tensor 'model.embed_tokens.weight'" in result.output
    assert "[384, 64]" in result.output and "[400, 64]" in result.output and "tokenizer_source" in result.output
    assert not (tmp_path / "out").exists()


def _broken_copy(source: Path, destination: Path, change) -> Path:
    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    change(tensors)
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


@pytest.mark.parametrize("case", ["missing_model", "missing_tensor", "shape", "unknown_method", "unknown_parameter",
                                  "density", "yaml", "layer_range", "nan", "zero_weights",
                                  "no_base"])
def test_bad_input_is_one_clear_error_and_no_output(trio, tmp_path, run_cli, case) -> None:
    base, ft1, ft2 = trio
    models = f"models:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    recipes = {
        "missing_model": (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tmp_path}/nowhere\n"
                          f"    parameters: {{weight: 1}}\n", "no such model folder"),
        "missing_tensor": (None, "is missing from"),
        "shape": (None, "shape mismatch for tensor"),
        "unknown_method": (f"merge_method: frankenstein\n{models}", "unknown merge method 'frankenstein'"),
        "unknown_parameter": (f"merge_method: ties\nbase_model: {base}\n{models}parameters: {{densty: 0.5}}\n",
                              "has no parameter 'densty'"),  # with --strict (below); mergekit ignores it
        "density": (f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
                    f"    parameters: {{weight: 1, density: -0.5}}\n", "density"),
        "yaml": ("merge_method: ties\nmodels:\n  - model: [a\n", "line"),
        "layer_range": (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n"
                        f"        layer_range: [0, 9]\n", "goes past the 2 layers"),
        "nan": (None, "NaN or Inf"),
        "zero_weights": (f"merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1}}\n"
                         f"  - model: {ft2}\n    parameters: {{weight: -1}}\n", "weights that sum to 0"),
        "no_base": (f"merge_method: ties\n{models}", "needs a base_model"),
    }
    text, message = recipes[case]
    if case == "missing_tensor":
        broken = _broken_copy(ft2, tmp_path / "broken", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
        text = f"merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1}}\n" \
               f"  - model: {broken}\n    parameters: {{weight: 1}}\n"
    if case == "shape":
        broken = _broken_copy(ft2, tmp_path / "broken", lambda t: t.update(
            {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)}))
        text = f"merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1}}\n" \
               f"  - model: {broken}\n    parameters: {{weight: 1}}\n"
    if case == "nan":
        def poison(tensors):
            tensors["model.norm.weight"][3] = float("nan")
        broken = _broken_copy(ft2, tmp_path / "broken", poison)
        text = f"merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1}}\n" \
               f"  - model: {broken}\n    parameters: {{weight: 1}}\n"
    recipe = _write(tmp_path, text)
    strict = ("--strict",) if case == "unknown_parameter" else ()
    result = run_cli("merge", recipe, tmp_path / "out", *strict, expect=None)
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_existing_output_needs_force(trio, tmp_path, run_cli) -> None:
    recipe = _write(tmp_path, _dare(trio))
    (tmp_path / "out").mkdir()
    assert "--force" in run_cli("merge", recipe, tmp_path / "out", expect=3).output
    run_cli("-q", "merge", recipe, tmp_path / "out", "--force")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_hidden_size_mismatch_is_not_blamed_on_the_tokenizer(tiny, tmp_path, run_cli) -> None:
    narrow = tiny.model("llama", hidden_size=32, intermediate_size=64)
    recipe = _write(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny.model('llama')}\n"
                              f"    parameters: {{weight: 1}}\n  - model: {narrow}\n    parameters: {{weight: 1}}\n"
                              "tokenizer_source: base\n")
    output = run_cli("merge", recipe, tmp_path / "out", expect=2).output
    assert "shape mismatch for tensor 'model.embed_tokens.weight'" in output and "[384, 32]" in output
    assert "tokenizer_source" not in output and "architecture" in output


def test_misspelt_keys_are_named_with_their_line_and_the_key_they_resemble(trio, tmp_path, run_cli) -> None:
    base, ft1, _ = trio
    missing = _write(tmp_path, f"merge_methd: linear\nmodels:\n  - model: {ft1}\n")
    output = run_cli("merge", missing, tmp_path / "out", expect=2).output
    assert "missing key 'merge_method'" in output and "`merge_methd` is not a recipe key" in output
    assert "line 1" in output and "did you mean `merge_method`?" in output
    misplaced = tmp_path / "other.yaml"
    misplaced.write_text(f"merge_method: linear\nmodles:\n  - model: {ft1}\n")
    output = run_cli("merge", misplaced, tmp_path / "out", expect=2).output
    assert "line 2" in output and "did you mean `models`?" in output
    parameter = tmp_path / "parameter.yaml"
    parameter.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters:\n      weight: 1\n"
                         f"  - model: {ft1}\n    parameters:\n      wieght: 1\n      weight: 1\n")
    result = run_cli("merge", parameter, tmp_path / "out", "--dry-run")
    assert "no parameter 'wieght'" in result.output and "line 8 (models[1].parameters.wieght)" in result.output
    assert "did you mean `weight`?" in result.output
    assert "line 8" in run_cli("merge", parameter, tmp_path / "out", "--strict", expect=2).output
