"""The lineage record: round trip, nesting, parents described from real folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mtool import __version__
from mtool.errors import InputError
from mtool.io.hashing import FileHasher
from mtool.lineage import LINEAGE_FILENAME, Dataset, Lineage, Parent, describe_parent, read_lineage, write_lineage


def test_round_trip_with_nested_parents(tmp_path: Path) -> None:
    trained = Lineage(
        operation="train", method="qlora", seed=7,
        parents=[Parent(id="meta-llama/Llama-3.1-8B", role="base", is_hub=True, revision="abc123",
                        files={"model.safetensors": "0" * 64}, license="llama3.1")],
        dataset=Dataset(id="data/train.jsonl", sha256="f" * 64, examples=100, format="alpaca"),
        recipe={"rank": 16, "lr": 2e-4}, metrics={"train_loss": 1.25}, is_adapter=True,
    )
    merged = Lineage(
        operation="merge", method="slerp", recipe={"merge_method": "slerp", "parameters": {"t": 0.5}}, seed=1,
        parents=[Parent(id="./adapter-merged", role="model", lineage=trained, weight=0.5),
                 Parent(id="mistralai/Mistral-7B-v0.1", role="base", is_hub=True)],
        outputs={"model.safetensors": "a" * 64}, parameter_count=123,
    )
    write_lineage(tmp_path, merged)
    raw = json.loads((tmp_path / LINEAGE_FILENAME).read_text())
    assert raw["tool_version"] == __version__ and raw["operation"] == "merge"
    loaded = read_lineage(tmp_path)
    assert loaded == merged
    assert [p.id for p in loaded.roots()] == ["meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.1"]
    assert [(d, p.id) for d, p in loaded.walk()] == [
        (1, "./adapter-merged"), (2, "meta-llama/Llama-3.1-8B"), (1, "mistralai/Mistral-7B-v0.1")]


def test_missing_and_malformed_records(tmp_path: Path) -> None:
    assert read_lineage(tmp_path) is None
    (tmp_path / LINEAGE_FILENAME).write_text('{"operation": "bake"}')
    with pytest.raises(InputError, match="malformed lineage"):
        read_lineage(tmp_path)


def test_describe_parent_hashes_weights_and_reads_license(tiny, tmp_path: Path) -> None:
    folder = tiny.model("llama", shards=2, license="apache-2.0")
    parent = describe_parent(folder, "base", hasher=FileHasher())
    assert parent.role == "base" and not parent.is_hub and parent.license == "apache-2.0"
    assert sorted(parent.files) == sorted(f.name for f in folder.glob("*.safetensors"))
    for name, digest in parent.files.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert parent.lineage is None
