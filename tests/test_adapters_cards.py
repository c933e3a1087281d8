"""Every adapters command leaves a model card that huggingface_hub reads back."""

from __future__ import annotations

from huggingface_hub import ModelCard


def test_merge_and_resize_write_cards(tiny, tmp_path, run_cli) -> None:
    base = tiny.model("llama")
    adapter = tiny.lora(base, rank=4, alpha=8)
    run_cli("-q", "adapters", "merge", base, adapter, tmp_path / "merged")
    run_cli("-q", "adapters", "resize", adapter, tmp_path / "smaller", "--rank", "2")
    merged = ModelCard.load(tmp_path / "merged" / "README.md").data
    smaller = ModelCard.load(tmp_path / "smaller" / "README.md").data
    assert merged.library_name == "transformers" and smaller.library_name == "peft"
    assert str(tmp_path) not in str(merged.to_dict().get("base_model", ""))
