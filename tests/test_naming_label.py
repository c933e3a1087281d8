"""Where a name's Label comes from: what distinguishes the artifact, never a word its parents share."""

from __future__ import annotations

from pathlib import Path

from mtool.lineage import Dataset, Lineage, Parent
from mtool.naming.label import derive_label, distinctive_words, label_of_record, reference_name


def _merge(ids: list[str], *, base: str | None = None, base_listed: bool = False) -> Lineage:
    parents = [Parent(id=i, role="model") for i in ids]
    models = [{"model": i} for i in ids]
    if base is not None:
        parents.insert(0, Parent(id=base, role="base"))
        if base_listed:
            models.insert(0, {"model": base})
    return Lineage(operation="merge", method="ties", parents=parents,
                   recipe={"merge_method": "ties", "models": models, **({"base_model": base} if base else {})})


def test_a_merge_is_labelled_by_its_models_without_their_shared_words() -> None:
    record = _merge(["/work/mtool-capitals", "/work/mtool-symbols"], base="/work/mtool-base")
    assert label_of_record(record).value == "CapitalsSymbols"


def test_standardized_parent_names_give_their_labels() -> None:
    record = _merge(["/m/Llama-558K-Capitals-SFT-v1.0", "Org/Llama-3.1-8B-Medic-DPO-v2.1"])
    assert label_of_record(record).value == "CapitalsMedic"


def test_the_base_counts_only_when_the_recipe_merges_it() -> None:
    slerp = _merge(["/m/Llama-558K-Symbols-SFT-v1.0"], base="/m/Llama-558K-Capitals-SFT-v1.0", base_listed=True)
    ties = _merge(["/m/Llama-558K-Symbols-SFT-v1.0"], base="/m/Llama-558K-Capitals-SFT-v1.0")
    assert label_of_record(slerp).value == "CapitalsSymbols"
    assert label_of_record(ties).value == "Symbols"


def test_training_is_labelled_by_its_first_data_set() -> None:
    record = Lineage(operation="train", recipe={"data": {"path": ["/d/capitals.jsonl", "/d/general.jsonl"]}},
                     dataset=Dataset(id="/d/capitals.jsonl, /d/general.jsonl"))
    assert label_of_record(record).value == "Capitals"
    hub = Lineage(operation="train", dataset=Dataset(id="tatsu-lab/alpaca", is_hub=True))
    assert label_of_record(hub).value == "Alpaca"


def test_an_adapter_merge_takes_its_adapters_label_through_its_record() -> None:
    trained = Lineage(operation="train", recipe={"data": {"path": ["symbols.jsonl"]}})
    record = Lineage(operation="adapter-merge", parents=[Parent(id="/m/base", role="base"),
                                                         Parent(id="/m/out", role="adapter", lineage=trained)])
    assert label_of_record(record).value == "Symbols"


def test_the_folders_own_standardized_name_comes_first(tmp_path: Path) -> None:
    folder = tmp_path / "Mistral-v0.1-7.2B-MythoKimiko-SLERP-v1.0"
    folder.mkdir()
    assert derive_label(folder, _merge(["/a/x-capitals", "/a/x-symbols"])).value == "MythoKimiko"
    other = tmp_path / "my-merge"
    other.mkdir()
    assert derive_label(other, _merge(["/a/x-capitals", "/a/x-symbols"])).value == "CapitalsSymbols"


def test_reference_names_keep_versions_and_drop_data_file_extensions() -> None:
    assert reference_name("/m/Llama-558K-Capitals-SFT-v1.0") == "Llama-558K-Capitals-SFT-v1.0"
    assert reference_name("/d/capitals.jsonl") == "capitals"
    assert distinctive_words("Gryphe/MythoMax-L2-13b") == ["MythoMax"]
