"""Cards that can be published as written: unknown licenses stay unknown until fixed (and the fix reaches every
descendant), local folders appear by name, numbers are rounded for people, no section is empty."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import ModelCard

from mtool.lineage import Lineage, Parent, read_lineage
from mtool.naming.card import build_card
from mtool.naming.card_body import lineage_tree
from mtool.naming.facts import family_of_reference
from mtool.naming.publishable import card_problems, display_reference, for_people, without_local_paths
from mtool.train.metrics import smoothed_final_loss


def _merge(run_cli, tmp_path: Path, name: str, base: Path, models: list[Path]) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    entries = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for m in models)
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{entries}dtype: float32\n")
    out = tmp_path / name
    run_cli("merge", recipe, out)
    return out


def test_an_unknown_license_stays_unknown_and_a_later_fix_reaches_every_descendant(tiny, tmp_path, run_cli) -> None:
    base = tmp_path / "hf_model"
    shutil.copytree(tiny.model("llama"), base)  # declares no license
    first, second, third = (tmp_path / f"ft{s}" for s in (1, 2, 3))
    for seed, folder in enumerate((first, second, third), start=1):
        shutil.copytree(tiny.finetune(base, seed=seed), folder)
        (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# a fine-tune\n")
    child = _merge(run_cli, tmp_path, "child", base, [first, second])
    grandchild = _merge(run_cli, tmp_path, "grandchild", base, [child, third])
    for folder in (child, grandchild):
        card = ModelCard.load(folder / "README.md")
        assert "license" not in card.data.to_dict()  # unknown is not guessed, and not "other"
        assert "The license is **unknown**" in card.text and "mtool card --license" in card.text
    parents = {p.id: p for p in read_lineage(grandchild).parents}
    assert parents[str(child)].license is None  # a derived card's license is never recorded as declared
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# base\n")  # the fix, made later
    run_cli("card", grandchild)
    assert ModelCard.load(grandchild / "README.md").data.license == "apache-2.0"
    run_cli("card", child, "--license", "cc-by-sa-4.0")  # a publisher's explicit choice, kept in the record
    run_cli("card", grandchild)
    assert ModelCard.load(grandchild / "README.md").data.license == "cc-by-sa-4.0"  # share-alike binds it


def test_generated_cards_are_publishable_and_the_check_finds_what_is_not(tiny, tmp_path, run_cli) -> None:
    base = tiny.model("llama", license="apache-2.0")
    merged = _merge(run_cli, tmp_path, "m", base, [tiny.finetune(base, seed=1), tiny.finetune(base, seed=2)])
    text = (merged / "README.md").read_text()
    assert card_problems(text) == []
    assert str(tmp_path) not in text and str(base) not in text
    summary = next(line for line in text.splitlines() if " merge of " in line)
    assert summary.count(f"`{base.name}`") == 1  # the base is named once, as the base
    assert "publishable" in run_cli("card", merged, "--check").output
    bad = text.replace("## Usage", "## Empty\n\n## Usage") + f"\nRead {tmp_path}/x/y and 7.352511405944824\n"
    (merged / "README.md").write_text(bad)
    report = run_cli("card", merged, "--check", expect=1).output
    assert "local path" in report and "unrounded number 7.352511405944824" in report and "is empty" in report


def test_a_record_without_parents_ends_the_tree_without_an_empty_list() -> None:
    base = Lineage(operation="base", method="pretrain", seed=0)
    lines = lineage_tree(Lineage(operation="merge", parents=[Parent(id="/x/base", role="base", lineage=base)]))
    assert lines[1].endswith("seed 0") and not any(line.endswith("from:") for line in lines)
    assert card_problems("---\nlicense: mit\n---\n\n# T\n\n- made by **base** from:\n\nText.\n") != []


def test_local_paths_are_shown_by_name_and_numbers_for_people() -> None:
    assert display_reference("/tmp/abc/Llama-8B-Medic") == "Llama-8B-Medic"
    assert display_reference("meta-llama/Llama-3.1-8B", is_hub=True) == "meta-llama/Llama-3.1-8B"
    recipe = {"models": [{"model": "/home/me/models/a"}], "base_model": "org/b", "data": ["/d/x.jsonl, /d/y.jsonl"]}
    assert without_local_paths(recipe) == {"models": [{"model": "a"}], "base_model": "org/b",
                                           "data": ["x.jsonl, y.jsonl"]}
    assert for_people({"loss": 7.352511405944824, "lr": 0.0002, "steps": 150}) == \
        {"loss": 7.353, "lr": 0.0002, "steps": 150}
    assert card_problems("---\nlicense: mit\n---\n\n# T\n\nSee https://huggingface.co/org/model/tree/main.\n") == []


def test_a_generic_folder_name_takes_the_family_from_the_id_it_was_saved_from(tmp_path: Path) -> None:
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama",
                                                    "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    found = family_of_reference(str(folder))
    assert found.value.family == "SmolLM2" and "_name_or_path" in found.source
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "README.md").write_text("---\nbase_model: Qwen/Qwen2.5-0.5B\n---\n")
    assert family_of_reference(str(folder)).value.family == "Qwen2.5"


def test_the_final_training_loss_is_a_token_mean_of_the_last_tenth_of_the_steps() -> None:
    rows = [{"step": i, "loss": float(i), "trained_tokens": 10 + i} for i in range(1, 21)]
    rows.append({"step": 20, "eval_loss": 0.5})
    result = smoothed_final_loss(rows)
    assert result["train_loss"] == (19 * 29 + 20 * 30) / (29 + 30)  # the last 2 of 20 steps, token-weighted
    assert result["train_loss_window"] == "token mean of the last 2 of 20 steps"
    assert smoothed_final_loss([]) == {}


def test_a_folder_card_builds_without_a_lineage(tiny) -> None:
    _, text = build_card(tiny.model("llama", license="apache-2.0"))
    assert card_problems(text) == []


def test_a_sentence_that_announces_nothing_is_found() -> None:
    text = "---\nlicense: mit\n---\n\n# T\n\nMade by **base** with mtool, from:\n\n## Next\n\nText.\n"
    assert any("does not follow" in problem for problem in card_problems(text))
