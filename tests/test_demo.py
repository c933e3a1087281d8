"""`mtool demo --quick`: the whole pipeline, checked end to end on its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtool.lineage import read_lineage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One reduced demo run through the CLI: (its folder, what it printed on stdout)."""
    from click.testing import CliRunner

    from mtool.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(main, ["demo", str(out), "--quick"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _accuracy(folder: Path) -> dict[str, dict[str, float]]:
    return {row["label"]: row["accuracy"] for row in _results(folder)["rows"]}


def _named_outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("Llama-"))


def test_prints_the_accuracy_table_and_each_fine_tune_beats_the_base_on_its_skill(demo) -> None:
    folder, printed = demo
    accuracy = _accuracy(folder)
    for label in ("base", "capitals fine-tune", "symbols fine-tune", "Linear merge", "SLERP merge", "TIES merge",
                  "DARE-TIES merge", "searched TIES merge", "adapters combined"):
        assert label in printed
        assert set(accuracy[label]) == {"capitals", "symbols", "general"}
    assert "capitals" in printed.splitlines()[1] and "general" in printed.splitlines()[1]
    assert "mean" in printed.splitlines()[1]
    for skill in ("capitals", "symbols"):
        assert accuracy["base"][skill] == 0.0  # the base never saw these facts
        assert accuracy[f"{skill} fine-tune"][skill] >= 0.75
    assert accuracy["base"]["general"] >= 0.9  # what it was pre-trained on
    assert (folder / "results.md").read_text().count("|") > 9 * 6
    assert json.loads((folder / "mtool-demo.json").read_text())["complete"] is True
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_names_lint_clean_and_cards_parse(demo) -> None:
    from huggingface_hub import ModelCard

    from mtool.naming.check import parse_name
    from mtool.naming.lint import lint_name

    folder, _ = demo
    outputs = _named_outputs(folder)
    assert len(outputs) == 10  # 2 adapters, 2 fine-tunes, 4 merges, 1 searched merge, 1 combined adapter
    assert set(_results(folder)["names"]) == {p.name for p in outputs}
    for output in outputs:
        report = lint_name(output.name, output)
        assert report.findings == [], (output.name, report.findings)
        assert parse_name(output.name).lora == (output / "adapter_config.json").is_file()
        card = ModelCard.load(output / "README.md")
        assert card.data.model_name == output.name
        assert card.data.license == "apache-2.0"  # the base's, carried through every step


def test_outputs_load_and_record_their_lineage(demo) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, _ = demo
    base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
    ids = torch.tensor([[5, 9, 42, 7, 100]])
    for output in _named_outputs(folder):
        record = read_lineage(output)
        assert record is not None
        if (output / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base",
                                                                                   dtype=torch.float32),
                                              output)
        else:
            model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
        assert torch.isfinite(model(ids).logits).all()
        operation = {"SFT-v1.0-LoRA": "train", "SFT-v1.0": "adapter-merge", "Linear-v1.0-LoRA": "combine"}
        expected = next((op for suffix, op in operation.items() if output.name.endswith(suffix)), "merge")
        assert record.operation == expected, output.name
    ties = read_lineage(next(p for p in _named_outputs(folder) if p.name.endswith("-TIES-v1.0")))
    assert {Path(p.id).name for p in ties.parents} == {"base", "Llama-558K-Capitals-SFT-v1.0",
                                                       "Llama-558K-Symbols-SFT-v1.0"}
    fine_tune = next(p for p in ties.parents if p.id.endswith("Capitals-SFT-v1.0"))
    assert fine_tune.lineage is not None and fine_tune.lineage.operation == "adapter-merge"  # the tree travels along
    del base


def test_adapter_space_combination_equals_the_linear_merge(demo) -> None:
    """cat with weights 0.5 + 0.5 adds half of each adapter's update: the mean of the two fine-tunes, which is
    what the linear merge wrote in weight space."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, _ = demo
    outputs = {p.name: p for p in _named_outputs(folder)}
    combined = outputs["Llama-558K-CapitalsSymbols-Linear-v1.0-LoRA"]
    linear = AutoModelForCausalLM.from_pretrained(outputs["Llama-558K-CapitalsSymbols-Linear-v1.0"],
                                                  dtype=torch.float32)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32),
                                        combined)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, linear(ids).logits, rtol=1e-4, atol=1e-4)


def test_refuses_to_overwrite(demo, run_cli, tmp_path: Path) -> None:
    folder, _ = demo
    result = run_cli("demo", folder, "--quick", expect=3)
    assert "already exists" in result.output and "--force" in result.output
    other = tmp_path / "not-a-demo"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = run_cli("demo", other, "--quick", "--force", expect=3)
    assert "not a folder written by `mtool demo`" in result.output
    assert (other / "keep.txt").read_text() == "mine"


def test_force_replaces_an_earlier_demo_even_a_failed_one_and_nothing_else(tmp_path: Path) -> None:
    from mtool.demo.pipeline import MARKER, prepare_folder
    from mtool.errors import OutputExistsError

    folder = prepare_folder(tmp_path / "demo", force=False)  # marked at once, before any step runs
    assert json.loads((folder / MARKER).read_text())["complete"] is False
    (folder / "half-written").mkdir()  # what a run that failed half-way leaves
    with pytest.raises(OutputExistsError, match="--force"):
        prepare_folder(folder, force=False)
    assert prepare_folder(folder, force=True) == folder
    assert sorted(p.name for p in folder.iterdir()) == [MARKER]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a folder written by `mtool demo`"):
        prepare_folder(other, force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_suggested_names_label_the_skills_even_for_renamed_copies(demo, tmp_path: Path) -> None:
    """The label comes from what distinguishes each model (its data, the labels of what it merged), not from the
    folder it happens to be in: copies under neutral names get the same names."""
    import shutil

    from mtool.naming.suggest import suggest_name

    folder, _ = demo
    outputs = _named_outputs(folder)
    assert len(outputs) == 10  # two adapters, their merges, four merges, the searched merge, the combined adapter
    for index, output in enumerate(outputs):
        assert str(suggest_name(output)) == output.name
        copy = tmp_path / f"output-{index}"
        shutil.copytree(output, copy)
        suggested = suggest_name(copy)
        assert str(suggested) == output.name
        assert suggested.label in ("Capitals", "Symbols", "CapitalsSymbols", "CapitalsSymbolsSearched")


def test_every_card_the_demo_writes_is_publishable(demo) -> None:
    from mtool.naming.publishable import card_problems

    folder, _ = demo
    cards = sorted(folder.glob("*/README.md"))
    assert len(cards) >= 9
    for card in cards:
        assert card_problems(card.read_text()) == [], card
def test_the_searched_merge_is_tuned_on_one_half_and_every_model_is_scored_on_the_other(demo) -> None:
    from huggingface_hub import ModelCard

    from mtool.demo.tasks import split_task

    folder, _ = demo
    outputs = {p.name: p for p in _named_outputs(folder)}
    searched = read_lineage(outputs["Llama-558K-CapitalsSymbolsSearched-TIES-v1.0"])
    assert searched.search is not None and len(searched.search.trials) == 4  # --quick: 4 trials
    assert searched.recipe == searched.search.trials[searched.search.best - 1].recipe
    tuned_on = [path for task in searched.search.evaluation["tasks"] for path in task["data"]]
    assert len(tuned_on) == 3 and all(path.endswith("-tune.jsonl") for path in tuned_on)
    tune = {json.loads(line)["prompt"] for path in tuned_on for line in Path(path).read_text().splitlines()}
    heldout = {json.loads(line)["prompt"] for line in (folder / "data" / "capitals-heldout.jsonl").read_text()
               .splitlines()}
    assert heldout and not tune & heldout  # the search never sees a held-out question
    from mtool.demo.tasks import capitals_task

    assert len(heldout) == len(split_task(capitals_task(8))["heldout"].pairs) == 4
    accuracy = _accuracy(folder)
    for output in [folder / "base", *outputs.values()]:
        if output.name.endswith("-LoRA") and "Linear" not in output.name:
            continue  # the trained adapters are not scored (their merged fine-tunes are)
        record = read_lineage(output)
        heldout_scores = {e.task: e.value for e in record.evaluations if e.dataset.id.endswith("-heldout.jsonl")}
        assert set(heldout_scores) == {"capitals", "symbols", "general"}, output.name
        row = next(r for r in _results(folder)["rows"] if r["folder"] == output.name)
        assert heldout_scores == accuracy[row["label"]]
    card = ModelCard.load(outputs["Llama-558K-CapitalsSymbolsSearched-TIES-v1.0"] / "README.md")
    assert "## Search" in card.text and {r.dataset_name for r in card.data.eval_results} == {"capitals", "symbols",
                                                                                             "general"}
