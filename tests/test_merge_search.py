"""`mtool merge --search`: deterministic for a seed, resumable after an interruption, one scratch model on disk at a
time, every trial's recipe re-runnable with `mtool merge` to the same bytes, the best merge written with its search
record, evaluations and chart, and bad spaces refused before any trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mtool.lineage import read_lineage
from tests.support.train_helpers import write_jsonl

pytest.importorskip("optuna")

TEXTS = ["The capital of France is Paris.", "Reverse the string: abc -> cba.", "A model merge combines weights.",
         "Question: what is two plus two? Answer: four."]


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TIES recipe over a tiny base and two fine-tunes, a space of its weights, densities and lambda, and an
    evaluation (perplexity on a few lines: a score that moves with every parameter)."""
    folder = tmp_path_factory.mktemp("search")
    base = tiny.model("llama")
    one, two = tiny.finetune(base, seed=1, scale=0.05), tiny.finetune(base, seed=2, scale=0.05)
    recipe = folder / "ties.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                                      "models": [{"model": str(one), "parameters": {"weight": 1.0, "density": 0.5}},
                                                 {"model": str(two), "parameters": {"weight": 1.0, "density": 0.5}}]}))
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({"parameters": [
        {"name": "weight", "model": 0, "range": [0.2, 1.5]}, {"name": "weight", "model": str(two), "range": [0.2, 1.5]},
        {"name": "density", "filters": [{"filter": "self_attn", "range": [0.2, 1.0]}, {"range": [0.2, 1.0]}]},
        {"name": "lambda", "range": [0.5, 2.0], "gradient": 2}]}))
    text = write_jsonl(folder / "text.jsonl", [{"text": line} for line in TEXTS])
    evaluation = folder / "eval.yaml"
    evaluation.write_text(yaml.safe_dump({"tasks": [{"name": "text", "kind": "perplexity", "data": str(text)}]}))
    return {"recipe": recipe, "space": space, "eval": evaluation, "folder": folder}


def _search(run_cli, setup, out: Path, trials: int, *extra, expect: int = 0):
    return run_cli("merge", setup["recipe"], out, "--search", setup["space"], "--eval", setup["eval"],
                   "--trials", trials, *extra, expect=expect)


def _trials(out: Path) -> list[tuple[dict, float]]:
    return [(trial.params, trial.score) for trial in read_lineage(out).search.trials]


def test_a_search_is_deterministic_and_writes_its_best_trial(setup, tmp_path: Path, run_cli) -> None:
    from huggingface_hub import ModelCard

    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    printed = _search(run_cli, setup, first, 5, "--seed", "3").stderr
    _search(run_cli, setup, second, 5, "--seed", "3")
    _search(run_cli, setup, other, 5, "--seed", "4")
    assert _trials(first) == _trials(second) and _trials(first) != _trials(other)
    assert "trial 5/5: score" in printed and (tmp_path / "first.search.jsonl").is_file()
    record = read_lineage(first)
    search = record.search
    scores = [trial.score for trial in search.trials]
    assert len(set(scores)) == 5 and search.best == 1 + scores.index(max(scores))
    best = search.trials[search.best - 1]
    per_model = [label for label in best.params if label.endswith(".weight")]  # after the model's folder name
    assert set(best.params) - set(per_model) == {"density@*", "density@self_attn", "lambda[0]", "lambda[1]"}
    assert len(per_model) == 2
    assert record.recipe == best.recipe and record.outputs == best.outputs  # the best trial, byte for byte
    # the recipe carries the optimizer's values to 4 significant digits (readable in the card, typed again as is)
    assert best.recipe["parameters"]["lambda"] == [float(f"{best.params[f'lambda[{i}]']:.4g}") for i in (0, 1)]
    assert best.recipe["parameters"]["density"][0]["filter"] == "self_attn"
    assert record.evaluations[0].task == "text" and record.evaluations[0].metric == "perplexity"
    assert best.score == pytest.approx(-record.evaluations[0].metrics["mean_token_loss"])
    assert (first / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.load(first / "README.md")
    assert "## Search" in card.text and "search.png" in card.text and card.data.eval_results[0].dataset_name == "text"


def test_an_interrupted_search_resumes_where_it_stopped(setup, tmp_path: Path, run_cli, monkeypatch) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from mtool.merger.search import STUDY_NAME, TrialRunner

    reference = tmp_path / "reference"
    _search(run_cli, setup, reference, 6, "--seed", "5")
    interrupted = tmp_path / "interrupted"
    original = TrialRunner.run

    def stop_at_the_fourth(self, recipe, position):
        if position == 3:
            raise KeyboardInterrupt
        return original(self, recipe, position)

    monkeypatch.setattr(TrialRunner, "run", stop_at_the_fourth)
    assert _search(run_cli, setup, interrupted, 6, "--seed", "5", expect=130).exit_code == 130
    assert not interrupted.exists()
    monkeypatch.setattr(TrialRunner, "run", original)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "interrupted.search.jsonl")))
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 3 + ["FAIL"]
    study.ask()  # a trial left running, as by a process that was killed
    printed = _search(run_cli, setup, interrupted, 6, "--seed", "5").stderr
    assert "resuming the search" in printed and "3 of 6 trials done" in printed
    assert "trial 1/6" not in printed and "trial 4/6" in printed
    assert _trials(interrupted) == _trials(reference)
    assert read_lineage(interrupted).outputs == read_lineage(reference).outputs
    printed = _search(run_cli, setup, interrupted, 6, "--seed", "5", "--force").stderr  # all done: no trial runs
    assert "6 of 6 trials done" in printed and "trial 6/6" not in printed


def _model_folders(root: Path) -> list[Path]:
    return sorted({path.parent for path in root.rglob("*.safetensors")})


def test_the_disk_holds_one_scratch_model_at_a_time(setup, tmp_path: Path, run_cli, monkeypatch) -> None:
    import mtool.evaluate.run as evaluation
    import mtool.merger.run as merging

    scratch = tmp_path / "scratch"
    seen: list[tuple[str, int]] = []
    execute, score_model = merging.execute, evaluation.score_model

    def counting_execute(plan, output, options, **kwargs):
        seen.append(("merge", len(_model_folders(scratch))))
        return execute(plan, output, options, **kwargs)

    def counting_score(*args, **kwargs):
        seen.append(("evaluate", len(_model_folders(scratch))))
        return score_model(*args, **kwargs)

    monkeypatch.setattr(merging, "execute", counting_execute)
    monkeypatch.setattr(evaluation, "score_model", counting_score)
    _search(run_cli, setup, tmp_path / "out", 4, "--scratch", scratch)
    assert seen == [("merge", 0), ("evaluate", 1)] * 4 + [("merge", 0)]  # the last: the best, into OUT
    assert list(scratch.iterdir()) == []


def test_every_trials_recipe_merges_again_to_the_same_bytes(setup, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    _search(run_cli, setup, out, 3, "--seed", "7")
    for trial in read_lineage(out).search.trials:
        recipe = tmp_path / f"trial-{trial.number}.yaml"
        recipe.write_text(yaml.safe_dump(trial.recipe))
        again = tmp_path / f"again-{trial.number}"
        run_cli("-q", "merge", recipe, again, "--seed", "7")
        assert read_lineage(again).outputs == trial.outputs


def test_bad_spaces_are_refused_before_any_trial(setup, tmp_path: Path, run_cli) -> None:
    def space(*dimensions: dict) -> Path:
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump({"parameters": list(dimensions)}))
        return path

    def refused(space_file: Path, *extra) -> str:
        result = run_cli("merge", setup["recipe"], tmp_path / "out", "--search", space_file, "--eval", setup["eval"],
                         "--trials", 2, *extra, expect=2)
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()
        assert not (tmp_path / "out.search.jsonl").exists()
        return result.output

    assert "merge method 'ties' has no parameter 't'" in refused(space({"name": "t", "range": [0, 1]}))
    assert "density" in refused(space({"name": "density", "model": 1, "range": [0.5, 1.5]}))
    assert "the recipe lists no model 'nowhere'" in refused(space({"name": "weight", "model": "nowhere",
                                                                   "range": [0, 1]}))
    assert "give either range: [low, high] or choices" in refused(space({"name": "weight", "model": 0}))
    message = refused(space({"name": "lambda", "range": [2, 1]}))
    assert "parameters.0: range must be [low, high] with low < high" in message and "line 2" in message
    checked = run_cli("merge", setup["recipe"], "--dry-run", "--search", setup["space"], "--eval", setup["eval"])
    assert "lambda: a gradient of 2 values in [0.5, 2]" in checked.stdout
    assert "density: self_attn in [0.2, 1]; other tensors in [0.2, 1]" in checked.stdout
    assert "evaluation: text (perplexity, weight 1)" in checked.stdout and "merge method: ties" in checked.stdout
    (tmp_path / "out").mkdir()
    result = run_cli("merge", setup["recipe"], tmp_path / "out", "--search", setup["space"], "--eval", setup["eval"],
                     expect=3)
    assert "already exists" in result.output


def test_a_study_file_of_another_search_is_refused(setup, tmp_path: Path, run_cli) -> None:
    _search(run_cli, setup, tmp_path / "out", 1, "--seed", "1")
    result = _search(run_cli, setup, tmp_path / "out", 1, "--seed", "2", "--force", expect=3)
    assert "the study file holds another search" in result.output
    assert json.loads((tmp_path / "out.search.jsonl").read_text().splitlines()[0])  # Optuna's journal, JSON lines


def test_the_first_trial_is_the_recipe_as_written_when_the_space_can_give_it(setup, tmp_path: Path,
                                                                               run_cli) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"parameters": [
        {"name": "weight", "model": 0, "range": [0.2, 1.5]}, {"name": "density", "model": 1, "range": [0.2, 1.0]},
        {"name": "lambda", "range": [0.5, 2.0]}]}))
    out = tmp_path / "out"
    printed = run_cli("merge", setup["recipe"], out, "--search", space, "--eval", setup["eval"], "--trials", 2).stderr
    assert any("trial 1/2" in line and "(the recipe as written)" in line for line in printed.splitlines())
    first, second = read_lineage(out).search.trials
    assert sorted(first.params.values()) == [0.5, 1.0, 1.0]  # density 0.5 and weight 1.0 as written, lambda's default
    assert first.params != second.params
    plain = tmp_path / "plain"
    run_cli("-q", "merge", setup["recipe"], plain)
    assert read_lineage(plain).outputs == first.outputs  # the recipe as written, merged


def test_written_values_are_read_with_mergekit_precedence_and_checked_against_the_space() -> None:
    from mtool.merger.recipe import parse_recipe
    from mtool.merger.space import BoundSpace, SearchSpace

    recipe = parse_recipe("merge_method: ties\nbase_model: b\nparameters: {weight: 0.7, density: "
                          "[{filter: self_attn, value: 0.4}, {value: 0.9}]}\nmodels:\n  - model: m1\n"
                          "    parameters: {weight: 1.2}\n  - model: m2\n  - model: b\n")

    def written(*dimensions: dict):
        return BoundSpace(SearchSpace.model_validate({"parameters": list(dimensions)}), recipe).written_params()

    both = written({"name": "weight", "model": "m1", "range": [0, 2]}, {"name": "weight", "model": 1, "range": [0, 1]})
    assert both == {"m1.weight": 1.2, "m2.weight": 0.7}  # the model's own value, else the global one
    assert written({"name": "density", "filters": [{"filter": "self_attn", "range": [0, 1]}, {"range": [0, 1]}]}) \
        == {"density@self_attn": 0.4, "density@*": 0.9}
    assert written({"name": "weight", "model": 0, "range": [0, 1]}) is None  # 1.2 lies outside
    assert written({"name": "lambda", "range": [0, 2], "gradient": 2}) is None  # the default is a scalar
    assert written({"name": "lambda", "choices": [0.5, 1.0]}) == {"lambda": 1.0}  # the method's default
    assert written({"name": "lambda", "range": [0.5, 2], "step": 0.25}) == {"lambda": 1.0}
    assert written({"name": "lambda", "range": [0.6, 2], "step": 0.25}) is None  # off the grid
