"""Names and cards of real folders: a merge, an adapter, a merged adapter, a fine-tune and a folder without lineage.

Each folder is a copy of a tiny model (the `tiny` fixture) with a lineage record written into it; the card
must round-trip through huggingface_hub's ModelCard/ModelCardData, llama.cpp's gguf-py must rebuild the name
from it, and no local path may ever become a base_model id.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtool.errors import InputError, OutputExistsError
from mtool.lineage import Dataset, Lineage, Parent, read_lineage, write_lineage
from mtool.naming.card import write_card
from mtool.naming.lint import lint_name
from mtool.naming.suggest import suggest_name

REVISION = "0e9e39f249a16976918f6564b8830bc894c89659"


@dataclass
class Folders:
    base: Path
    merge: Path
    adapter: Path
    merged_adapter: Path
    finetune: Path
    local_merge: Path
    bare: Path


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _count(folder: Path) -> int:
    """Parameters in the folder's safetensors files, read with safetensors itself."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                total += _product(handle.get_slice(key).get_shape())
    return total


def _product(shape) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


def _label(count: int) -> str:
    gguf = pytest.importorskip("gguf")
    return gguf.size_label(count, count, 0, 0)


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory) -> Folders:
    root = tmp_path_factory.mktemp("naming")
    base = _copy(tiny.model("llama"), root / "base")
    tuned = tiny.finetune(tiny.model("llama"), seed=1)
    trained = Lineage(
        operation="train", method="qlora", seed=3, is_adapter=True,
        parents=[Parent(id="meta-llama/Llama-3.1-8B-Instruct", role="base", is_hub=True, revision=REVISION,
                        path=str(base), files={"model.safetensors": "a" * 64}, license="llama3.1")],
        dataset=Dataset(id="medalpaca/medical_meadow_wikidoc", is_hub=True, sha256="b" * 64, examples=1000,
                        format="alpaca"),
        recipe={"lora": {"r": 4, "alpha": 8}, "learning_rate": 2e-4, "objective": "sft"},
        parameters={"objective": "sft", "learning_rate": 2e-4, "epochs": 1},
        metrics={"train_loss": 1.23, "eval_loss": 1.41})
    adapter = _copy(tiny.lora(tiny.model("llama"), rank=4), root / "adapter")
    write_lineage(adapter, trained)

    kimiko = _copy(tuned, root / "Kimiko-13b")
    merge = _copy(tuned, root / "merge")
    write_lineage(merge, Lineage(
        operation="merge", method="slerp",
        recipe={"merge_method": "slerp", "base_model": "meta-llama/Llama-2-13b-hf",
                "models": [{"model": "Gryphe/MythoMax-L2-13b"}, {"model": str(kimiko)}],
                "parameters": {"t": 0.5}, "dtype": "float32"},
        parents=[Parent(id="meta-llama/Llama-2-13b-hf", role="base", is_hub=True, revision=REVISION,
                        files={"model.safetensors": "c" * 64}, license="llama2"),
                 Parent(id="Gryphe/MythoMax-L2-13b", role="model", is_hub=True, revision=REVISION,
                        files={"model.safetensors": "d" * 64}, license="other"),
                 Parent(id=str(kimiko), role="model", is_hub=False, path=str(kimiko),
                        files={"model.safetensors": "e" * 64}, lineage=Lineage(
                            operation="train", method="full", seed=11, parameters={"objective": "sft"},
                            parents=[Parent(id="meta-llama/Llama-2-13b-hf", role="base", is_hub=True,
                                            license="llama2")]))]))

    merged_adapter = _copy(tuned, root / "merged-adapter")
    preference = trained.model_copy(update={
        "parameters": {"objective": "dpo", "beta": 0.1},
        "dataset": Dataset(id="teknium/OpenHermes-2.5", is_hub=True, sha256="f" * 64),
        "parents": [Parent(id="mistralai/Mistral-7B-v0.1", role="base", is_hub=True, license="apache-2.0")]})
    write_lineage(merged_adapter, Lineage(
        operation="adapter-merge", method="lora",
        parents=[Parent(id="mistralai/Mistral-7B-v0.1", role="base", is_hub=True, revision=REVISION, path=str(base),
                        files={"model.safetensors": "1" * 64}, license="apache-2.0"),
                 Parent(id=str(adapter), role="adapter", is_hub=False, path=str(adapter),
                        files={"adapter_model.safetensors": "2" * 64}, lineage=preference)],
        parameters={"weights": [1.0]}))

    finetune = _copy(tuned, root / "finetune")
    (finetune / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    write_lineage(finetune, Lineage(
        operation="train", method="full", seed=5,
        parents=[Parent(id="Qwen/Qwen2.5-7B-Instruct", role="base", is_hub=True, revision=REVISION,
                        license="apache-2.0")],
        dataset=Dataset(id="/data/tutor_chats.jsonl", sha256="9" * 64, examples=250),
        recipe={"objective": "orpo", "epochs": 2}, parameters={"objective": "orpo", "epochs": 2},
        metrics={"train_loss": 0.9}))

    local_merge = _copy(tuned, root / "local-merge")
    write_lineage(local_merge, Lineage(
        operation="merge", method="ties",
        parents=[Parent(id=str(kimiko), role="model", path=str(kimiko), license="apache-2.0"),
                 Parent(id=str(base), role="base", path=str(base), license="apache-2.0")]))

    bare = _copy(base, root / "bare")
    (bare / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# bare\n", encoding="utf-8")
    return Folders(base, merge, adapter, merged_adapter, finetune, local_merge, bare)


def test_suggested_names_come_from_the_lineage(folders: Folders) -> None:
    base_size = _label(_count(folders.base))
    full_size = _label(_count(folders.merge))
    assert str(suggest_name(folders.merge)) == f"Llama-2-{full_size}-MythoMaxKimiko-SLERP-v1.0"
    assert str(suggest_name(folders.adapter)) == \
        f"Llama-3.1-{base_size}-Instruct-MedicalMeadowWikidoc-SFT-v1.0-LoRA"
    assert str(suggest_name(folders.merged_adapter)) == f"Mistral-v0.1-{full_size}-OpenHermes-DPO-v1.0"
    assert str(suggest_name(folders.finetune, label="Tutor", version="2.1")) == \
        f"Qwen2.5-{full_size}-Instruct-Tutor-ORPO-v2.1"


def test_suggest_cli_and_its_errors(folders: Folders, run_cli) -> None:
    result = run_cli("name", "suggest", folders.adapter, "--label", "Medic", "--version", "v1.2")
    assert result.output.strip().endswith("-Instruct-Medic-SFT-v1.2-LoRA")
    assert "--method" in run_cli("name", "suggest", folders.bare, expect=2).output
    assert run_cli("name", "suggest", folders.bare, "--method", "SFT", "--label", "Bare").output.startswith("Llama-")
    assert "not a version" in run_cli("name", "suggest", folders.adapter, "--version", "one", expect=2).output
    assert "Label" in run_cli("name", "suggest", folders.adapter, "--label", "Bad.Label", expect=2).output


def test_lint_against_the_folder(folders: Folders) -> None:
    size = _label(_count(folders.base))
    good = f"Llama-3.1-{size}-Instruct-Medic-SFT-v1.0-LoRA"
    assert lint_name(good, folders.adapter).ok
    rules = {f.rule for f in lint_name("Llama-3.1-70B-Instruct-Medic-SFT-v1.0-LoRA", folders.adapter).findings}
    assert "size-mismatch" in rules
    rules = {f.rule for f in lint_name(f"Mistral-v0.1-{size}-Instruct-Medic-SFT-v1.0-LoRA", folders.adapter).findings}
    assert "family-mismatch" in rules
    report = lint_name(f"Llama-3.1-{size}-Instruct-Medic-SLERP-v1.0", folders.adapter)
    assert {"lora-mismatch", "relation-mismatch"} <= {f.rule for f in report.findings}
    assert report.suggestion == good
    full = _label(_count(folders.merge))
    rules = {f.rule for f in lint_name(f"Llama-2-{full}-MythoMaxKimiko-TIES-v1.0", folders.merge).findings}
    assert rules == {"method-mismatch"}


def test_lint_cli_with_model(folders: Folders, run_cli) -> None:
    size = _label(_count(folders.merge))
    run_cli("name", "lint", f"Llama-2-{size}-MythoMaxKimiko-SLERP-v1.0", "--model", folders.merge)
    result = run_cli("name", "lint", "Llama-2-13B-MythoMaxKimiko-SLERP-v1.0", "--model", folders.merge, expect=1)
    assert "size-mismatch" in result.output and f"Llama-2-{size}-MythoMaxKimiko-SLERP-v1.0" in result.output


def _load(path: Path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    return card, card.data.to_dict()


@pytest.mark.parametrize("kind, relation, library, license", [
    ("merge", "merge", "transformers", "other"),
    ("adapter", "adapter", "peft", "llama3.1"),
    ("merged_adapter", "finetune", "transformers", "apache-2.0"),
    ("finetune", "finetune", "transformers", "apache-2.0"),
])
def test_card_round_trips_through_model_card(folders: Folders, tmp_path: Path, kind: str, relation: str,
                                             library: str, license: str) -> None:
    from huggingface_hub import ModelCardData

    folder = getattr(folders, kind)
    path = write_card(folder, out=tmp_path / "README.md")
    card, data = _load(path)
    assert ModelCardData(**data).to_dict() == data  # ModelCardData rebuilds the same metadata
    assert data["base_model_relation"] == relation
    assert data["library_name"] == library
    assert data["license"] == license
    name = str(suggest_name(folder))
    assert data["model_name"] == name
    assert card.text.lstrip().startswith(f"# {name}")
    for placeholder in ("[More Information Needed]", "{{", "}}", "TODO", "None |", "| None"):
        assert placeholder not in card.content
    hub_ids = {"merge": ["meta-llama/Llama-2-13b-hf", "Gryphe/MythoMax-L2-13b"],
               "adapter": "meta-llama/Llama-3.1-8B-Instruct", "merged_adapter": "mistralai/Mistral-7B-v0.1",
               "finetune": "Qwen/Qwen2.5-7B-Instruct"}[kind]
    assert data["base_model"] == hub_ids
    assert "mtool" in data["tags"]


def test_card_body_documents_the_lineage(folders: Folders, tmp_path: Path) -> None:
    _, data = _load(write_card(folders.merge, out=tmp_path / "merge.md"))
    merge = (tmp_path / "merge.md").read_text()
    assert {"merge", "mergekit", "slerp"} <= set(data["tags"])
    assert REVISION in merge and "d" * 64 in merge and "e" * 64 in merge  # parents' revisions and hashes
    assert "made by **train** (full) with mtool" in merge and "seed 11" in merge  # the embedded record
    assert "merge_method: slerp" in merge  # the canonical recipe
    assert "No random seed" in merge
    assert "Llama 2 is licensed under the LLAMA 2 Community License" in merge
    assert "Gryphe/MythoMax-L2-13b uses a custom license" in merge

    write_card(folders.adapter, out=tmp_path / "adapter.md")
    adapter = (tmp_path / "adapter.md").read_text()
    assert "PeftModel.from_pretrained" in adapter and 'base_id = "meta-llama/Llama-3.1-8B-Instruct"' in adapter
    assert "**Built with Llama**" in adapter and "Random seed: `3`" in adapter
    assert "| train_loss | 1.23 |" in adapter and "| learning_rate | 0.0002 |" in adapter
    assert "medalpaca/medical_meadow_wikidoc" in adapter

    _, data = _load(write_card(folders.finetune, out=tmp_path / "finetune.md"))
    finetune = (tmp_path / "finetune.md").read_text()
    assert "![Training loss](loss.png)" in finetune
    assert "datasets" not in data and "tutor_chats.jsonl" in finetune  # local data: body only, by name
    assert "/data/tutor_chats.jsonl" not in finetune
    assert "AutoModelForCausalLM.from_pretrained(model_id" in finetune and "apply_chat_template" in finetune
    assert {"orpo", "fine-tune"} <= set(data["tags"])


def test_gguf_converter_reads_the_name_back(folders: Folders, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    for kind in ("merge", "adapter", "merged_adapter", "finetune"):
        folder = tmp_path / kind
        shutil.copytree(getattr(folders, kind), folder)
        write_card(folder)
        metadata = gguf.Metadata.load(model_path=folder)
        name = suggest_name(folder)
        rebuilt = gguf.naming_convention(metadata.name, metadata.basename, metadata.finetune, metadata.version,
                                         metadata.size_label, None, "LoRA" if name.lora else None)
        assert rebuilt == str(name)
        assert metadata.name == str(name)


def test_no_local_path_is_ever_a_base_model_id(folders: Folders, tmp_path: Path) -> None:
    for kind in ("merge", "adapter", "merged_adapter", "finetune", "local_merge", "bare"):
        _, data = _load(write_card(getattr(folders, kind), out=tmp_path / f"{kind}.md"))
        ids = data.get("base_model") or []
        for model_id in [ids] if isinstance(ids, str) else ids:
            assert not Path(model_id).exists() and not model_id.startswith(("/", ".", "~"))
            assert model_id.count("/") == 1
    _, data = _load(tmp_path / "local_merge.md")
    assert "base_model" not in data and "base_model_relation" not in data
    text = (tmp_path / "local_merge.md").read_text()
    assert "not written as `base_model` ids" in text and f"`{folders.base.name}`" in text
    assert str(folders.base) not in text  # local folders by name and hash, never by path


def test_folder_without_lineage_gets_a_card_with_its_gaps(folders: Folders, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "bare.md"
    run_cli("card", folders.bare, "--out", out)
    card, data = _load(out)
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["model_basename"] == "Llama" and data["model_size_label"] == _label(_count(folders.bare))
    assert "## Gaps" in card.text and "no lineage record" in card.text and "no standardized name" in card.text


def test_card_cli_regenerates_its_own_cards_and_keeps_hand_written_ones(folders: Folders, tmp_path: Path,
                                                                        run_cli) -> None:
    folder = tmp_path / "finetune"
    shutil.copytree(folders.finetune, folder)
    first = run_cli("card", folder)
    assert "wrote" in first.output and (folder / "README.md").is_file()
    again = run_cli("card", folder, "--license", "mit", "--name", "Qwen2.5-1M-Instruct-Tutor-ORPO-v1.1",
                    "--repo-id", "someone/Qwen2.5-Tutor")
    assert "regenerated" in again.output  # a card mtool wrote is derived from the record: written again
    card, data = _load(folder / "README.md")
    assert data["license"] == "mit" and data["model_version"] == "v1.1"
    assert 'model_id = "someone/Qwen2.5-Tutor"' in card.text and "chosen by its publisher" in card.text
    assert "less restrictive" not in card.text  # apache-2.0 parents: mit is no less restrictive
    assert read_lineage(folder).license == "mit"  # kept: the next card (and descendants) use it
    assert _load_again(run_cli, folder)["license"] == "mit"
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\nMy own words.\n")
    result = run_cli("card", folder, expect=OutputExistsError.exit_code)
    assert "--force" in result.output and "My own words" in (folder / "README.md").read_text()
    printed = run_cli("card", folder, "--stdout")
    assert printed.output.startswith("---\n") and "My own words" in (folder / "README.md").read_text()
    run_cli("card", folder, "--force")
    assert "My own words" not in (folder / "README.md").read_text()
    assert "not a valid model name" in run_cli("card", folder, "--name", "bad name", expect=2).output


def _load_again(run_cli, folder: Path) -> dict:
    run_cli("card", folder)
    return _load(folder / "README.md")[1]


def test_write_card_on_a_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        write_card(tmp_path / "missing")


def test_lint_accepts_a_release_the_config_cannot_confirm(folders: Folders) -> None:
    size = _label(_count(folders.local_merge))
    report = lint_name(f"Llama-3.1-{size}-Kimiko-TIES-v1.0", folders.local_merge)
    assert report.ok and "unverified" in {f.rule for f in report.findings}
    report = lint_name(f"Mistral-{size}-Kimiko-TIES-v1.0", folders.local_merge)
    assert "family-mismatch" in {f.rule for f in report.findings}
    assert report.suggestion == f"Llama-{size}-Kimiko-TIES-v1.0"


def test_a_staging_folder_is_named_after_its_target(tmp_path: Path) -> None:
    from mtool.naming.facts import output_name

    assert output_name(tmp_path / ".Medic-out.partial-k2j_9x") == "Medic-out"
    assert output_name(tmp_path / "plain") == "plain"


def test_mtool_merge_writes_a_card_that_names_the_merge(folders: Folders, tmp_path: Path, run_cli) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {folders.base}\nmodels:\n  - model: {folders.base}\n"
                      f"  - model: {folders.local_merge}\nparameters:\n  t: 0.3\ndtype: float32\n", encoding="utf-8")
    out = tmp_path / "Kimiko-merge"
    run_cli("merge", recipe, out)
    card, data = _load(out / "README.md")
    size = _label(_count(out))
    # the merged model is itself a merge of Kimiko: its label is the label of what it merged
    assert data["model_name"] == str(suggest_name(out)) == f"Llama-{size}-Kimiko-SLERP-v1.0"
    assert "base_model" not in data and "slerp" in data["tags"]
    assert "`local-merge`" in card.text and str(folders.local_merge) not in card.text
    assert "merge_method: slerp" in card.text
