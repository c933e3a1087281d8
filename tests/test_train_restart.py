"""A training run that died before its first checkpoint is not stuck: running it again starts over (and
``--resume`` starts from step 0, saying so), with exactly the losses and weights of a run that never died."""

from __future__ import annotations

import pytest
import torch

from mtool import ui
from mtool.train import loop as loop_module
from mtool.train.config import validate_config
from mtool.train.run import train
from tests.support.train_helpers import alpaca_records, base_config, step_losses, write_jsonl

STEPS = 4


def _config(base, data, out):
    # checkpoints every 100 steps: a run of 4 steps writes none before it ends
    return validate_config(base_config(base, data, out, **{"training.max_steps": STEPS, "checkpoints.every": 100,
                                                           "lora.dropout": 0.1}), where="test")




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", alpaca_records(16))


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "adapter"
    train(_config(tiny_llama, data, out))
    return out


def _die_at_step_3(tiny_llama, data, out, monkeypatch) -> None:
    """Run until step 3 and die there (after steps 1 and 2 were logged, before any checkpoint)."""
    real_step = loop_module.train_step

    def step(loop, stop):
        if loop.progress.step == 2:
            raise RuntimeError("the machine went away")
        return real_step(loop, stop)

    monkeypatch.setattr(loop_module, "train_step", step)
    config = _config(tiny_llama, data, out)
    with pytest.raises(RuntimeError, match="went away"):
        train(config)
    monkeypatch.undo()
    directory = config.checkpoint_dir
    assert not out.exists() and directory.is_dir() and not list(directory.glob("step-*"))
    assert len(step_losses(directory)) == 2  # what an earlier mtool refused to start over from


def _same(out, reference) -> None:
    from safetensors.torch import load_file

    assert step_losses(out) == step_losses(reference)  # the dead run's steps are not in the history
    expected = load_file(reference / "adapter_model.safetensors")
    for name, tensor in load_file(out / "adapter_model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


def test_running_again_starts_over(tiny_llama, data, uninterrupted, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "adapter"
    _die_at_step_3(tiny_llama, data, out, monkeypatch)
    capsys.readouterr()
    monkeypatch.setattr(ui.VERBOSITY, "quiet", False)  # an earlier `mtool -q` in this process may have set it
    train(_config(tiny_llama, data, out))  # neither --resume nor --force
    assert "an earlier run stopped before its first one; starting over" in capsys.readouterr().err
    _same(out, uninterrupted)


def test_resume_without_a_checkpoint_starts_from_step_0_and_says_so(tiny_llama, data, uninterrupted, tmp_path,
                                                                    monkeypatch, capsys) -> None:
    out = tmp_path / "adapter"
    _die_at_step_3(tiny_llama, data, out, monkeypatch)
    capsys.readouterr()
    train(_config(tiny_llama, data, out), resume=True)
    assert "warning: --resume: there is no checkpoint in" in capsys.readouterr().err
    _same(out, uninterrupted)


def test_a_run_with_checkpoints_still_needs_resume_or_force(tiny_llama, data, tmp_path, run_cli) -> None:
    out = tmp_path / "adapter"
    common = ["--base", tiny_llama, "--data", data, "--quantization", "none", "--compute-dtype", "float32",
              "--optimizer", "adamw", "--rank", "2", "--max-steps", "2", "--save-every", "1"]
    run_cli("-q", "train", *common, "--out", out)
    result = run_cli("-q", "train", *common, "--out", tmp_path / "again", "--set",
                     f"checkpoints.dir={tmp_path / 'adapter-checkpoints'}", expect=3)
    assert "checkpoints of an earlier run exist" in result.stderr and "(the newest is step-000001)" in result.stderr
