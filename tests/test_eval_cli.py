"""`mtool eval` as a command: tasks from data columns or a spec, table / JSON / chart / samples, results kept in the
lineage record and the card (model-index, as huggingface_hub reads it), the memory check before loading, and
one-line errors for bad input."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mtool.lineage import Evaluation, read_lineage, update_lineage
from tests.support.train_helpers import write_jsonl

QA = [{"prompt": "What is the capital of France?", "answer": "Paris"},
      {"prompt": "Reverse the string: abc", "answer": ["cba", "CBA"]}]


@pytest.fixture
def merged(tiny, tmp_path: Path, run_cli) -> Path:
    """A merge written by mtool (with its lineage record and card)."""
    base = tiny.model("llama")
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {tiny.finetune(base, seed=1)}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    out = tmp_path / "Llama-160K-Test-Linear-v1.0"
    run_cli("-q", "merge", recipe, out)
    return out


def _data(tmp_path: Path) -> dict[str, Path]:
    return {"qa": write_jsonl(tmp_path / "qa.jsonl", QA),
            "mc": write_jsonl(tmp_path / "mc.jsonl", [{"question": "Capital of France?", "choices": ["Paris", "Rome"],
                                                       "answer": "Paris"}]),
            "text": write_jsonl(tmp_path / "text.jsonl", [{"text": "The capital of France is Paris."}])}


def test_kinds_come_from_the_columns_and_every_output_is_written(merged: Path, tmp_path: Path, run_cli) -> None:
    data = _data(tmp_path)
    chart, samples = tmp_path / "chart.png", tmp_path / "samples.jsonl"
    result = run_cli("eval", merged, "--data", data["qa"], "--data", data["mc"], "--data", data["text"],
                     "--json", "--chart", chart, "--samples", samples, "--no-record")
    (model,) = json.loads(result.stdout)
    kinds = {task["task"]: (task["kind"], task["metric"]) for task in model["tasks"]}
    assert kinds == {"qa": ("exact_match", "accuracy"), "mc": ("multiple_choice", "accuracy"),
                     "text": ("perplexity", "perplexity")}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [row["task"] for row in rows] == ["qa", "qa", "mc"] and rows[1]["accepted"] == ["cba", "CBA"]
    assert read_lineage(merged).evaluations is None  # --no-record
    table = run_cli("eval", merged, "--data", data["qa"], "--no-record").stdout
    assert "qa (accuracy)" in table.splitlines()[0] and str(merged) in table


def test_results_go_into_the_lineage_record_and_the_cards_model_index(merged: Path, tmp_path: Path, run_cli) -> None:
    from huggingface_hub import ModelCard

    data = _data(tmp_path)
    weights = read_lineage(merged).outputs
    name = ModelCard.load(merged / "README.md").data.model_name
    run_cli("eval", merged, "--data", data["qa"], "--data", data["text"])
    record = read_lineage(merged)
    assert [(e.task, e.kind, e.metric) for e in record.evaluations] == [("qa", "exact_match", "accuracy"),
                                                                        ("text", "perplexity", "perplexity")]
    assert record.outputs == weights and record.operation == "merge"  # the rest of the record is as it was
    assert record.evaluations[0].dataset.sha256 is not None and record.evaluations[0].settings["device"] == "cpu"
    card = ModelCard.load(merged / "README.md")
    assert card.data.model_name == name
    results = {r.dataset_name: r for r in card.data.eval_results}
    assert results["qa"].metric_type == "accuracy" and results["qa"].task_type == "text-generation"
    assert results["qa"].metric_value == pytest.approx(record.evaluations[0].value, rel=5e-4)  # 4 digits shown
    assert results["text"].metric_value == pytest.approx(record.evaluations[1].value, rel=5e-4)
    text = (merged / "README.md").read_text()
    assert "## Evaluation" in text and f"\nmodel_name: {name}\n" in text  # llama.cpp reads it at the top
    gguf = pytest.importorskip("gguf")
    assert gguf.Metadata.load(model_path=merged).name == name  # llama.cpp's converter still finds the name
    run_cli("-q", "eval", merged, "--data", data["qa"], "--limit", "1")  # another measurement (one example): added
    run_cli("-q", "eval", merged, "--data", data["qa"])  # the same measurement again: replaced, not repeated
    tasks = [(e.task, e.dataset.examples) for e in read_lineage(merged).evaluations]
    assert sorted(tasks) == [("qa", 1), ("qa", 2), ("text", 1)]


def test_the_card_keeps_its_name_and_license(merged: Path, tmp_path: Path, run_cli) -> None:
    from huggingface_hub import ModelCard

    run_cli("-q", "card", merged, "--name", "Llama-160K-Renamed-Linear-v2.0", "--license", "mit", "--force")
    run_cli("-q", "eval", merged, "--data", _data(tmp_path)["qa"])
    card = ModelCard.load(merged / "README.md")
    assert card.data.model_name == "Llama-160K-Renamed-Linear-v2.0" and card.data.license == "mit"
    assert card.data.eval_results[0].dataset_name == "qa"


def test_folders_without_an_mtool_record_or_card_are_left_alone(tiny, merged: Path, tmp_path: Path, run_cli) -> None:
    plain = tiny.model("llama", seed=5)
    before = sorted(p.name for p in plain.iterdir())
    result = run_cli("eval", plain, "--data", _data(tmp_path)["qa"])
    assert "has no mtool lineage record" in result.stderr
    assert sorted(p.name for p in plain.iterdir()) == before
    (merged / "README.md").write_text("# my own card\n")
    run_cli("eval", merged, "--data", _data(tmp_path)["qa"])
    assert (merged / "README.md").read_text() == "# my own card\n" and read_lineage(merged).evaluations


def test_an_adapter_is_evaluated_on_its_base(tiny, tmp_path: Path, run_cli) -> None:
    base = tiny.model("llama")
    adapter = tiny.lora(base, rank=4)
    data = _data(tmp_path)["text"]
    on_base = json.loads(run_cli("-q", "eval", adapter, "--data", data, "--json").stdout)[0]
    assert on_base["model"] == f"{adapter} on {Path(base).resolve()}" and on_base["base"] == str(Path(base).resolve())
    plain = json.loads(run_cli("-q", "eval", base, "--data", data, "--json", "--no-record").stdout)[0]
    assert on_base["tasks"][0]["value"] != plain["tasks"][0]["value"]  # the adapter changes the model


def test_concurrent_additions_to_a_record_are_all_kept(merged: Path) -> None:
    def add(index: int) -> None:
        evaluation = Evaluation(task=f"t{index}", kind="exact_match", metric="accuracy", value=index / 10)
        update_lineage(merged, lambda record: setattr(record, "evaluations", [*(record.evaluations or []),
                                                                               evaluation]))

    threads = [threading.Thread(target=add, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(e.task for e in read_lineage(merged).evaluations) == [f"t{index}" for index in range(8)]


def test_a_model_too_large_for_memory_is_refused_before_loading(merged: Path, tmp_path: Path, run_cli,
                                                                  monkeypatch) -> None:
    import transformers

    import mtool.evaluate.models as models

    def must_not_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models, "free_memory", lambda device: 100_000)  # 0.1 MB free: less than its weights
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    result = run_cli("eval", merged, "--data", _data(tmp_path)["qa"], expect=2)
    assert "is too large for the memory: its weights need" in result.output and "float32" in result.output
    assert "--dtype bfloat16" in result.output and "Traceback" not in result.output


def test_bad_input_is_one_clear_line(merged: Path, tmp_path: Path, run_cli) -> None:
    no_answer = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"},
                                                     {"prompt": "Capital of Japan?", "answer": 3}])
    result = run_cli("eval", merged, "--data", no_answer, "--task", "exact_match", expect=2)
    assert "answer must be a string or a list of strings" in result.output and "example 2" in result.output
    assert "nothing to evaluate" in run_cli("eval", merged, expect=2).output
    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    assert "cannot tell what to evaluate from the columns" in run_cli("eval", merged, "--data", unknown,
                                                                      expect=2).output
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"tasks:\n  - name: qa\n    kind: exact_match\n    data: {tmp_path / 'qa.jsonl'}\n"
                    "    max_new_token: 4\n")
    result = run_cli("eval", merged, "--spec", spec, expect=2)
    assert "tasks.0.max_new_token: unknown key 'max_new_token'" in result.output and "line 5" in result.output
    assert "Traceback" not in result.output
    assert read_lineage(merged).evaluations is None
