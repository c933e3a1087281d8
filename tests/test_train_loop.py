"""End-to-end training on tiny models: learning, saved adapters, accumulation, resuming, stopping, failures."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from mtool.errors import ComputeError
from mtool.train import loop as loop_module
from mtool.train.batching import collate, epoch_order
from mtool.train.config import validate_config
from mtool.train.run import prepare_data, train
from mtool.train.tokenizer import load_tokenizer
from tests.support.train_helpers import alpaca_records, base_config, chat_records, step_losses, write_jsonl


def config_of(base, data, out, **overrides):
    return validate_config(base_config(base, data, out, **overrides), where="test")




def eval_loss_float64(model, dataset, pad_id):
    """The token-mean cross-entropy over ``dataset``, computed independently of the loop (float64)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in dataset:
            batch = collate([row], packing=False, pad_id=pad_id)
            logits = model(input_ids=batch.inputs["input_ids"]).logits[0, :-1].double()
            labels = batch.inputs["labels"][0, 1:]
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", alpaca_records(24))


@pytest.fixture(scope="module")
def reference_run(tiny_llama, alpaca_file, tmp_path_factory):
    """An uninterrupted run with dropout (so the random state matters) and checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("reference") / "adapter"
    train(resumable_config(tiny_llama, alpaca_file, out, every=2))
    return out


def resumable_config(base, data, out, *, every):
    """Dropout on (so the random state matters), a warm-up and a cosine decay (so the schedule position does)."""
    return config_of(base, data, out, **{"lora.dropout": 0.1, "training.max_steps": 8, "checkpoints.every": every,
                                         "training.schedule": "cosine", "training.warmup_steps": 2})


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_loss_falls_and_the_saved_adapter_reloads_with_the_same_eval_loss(tiny_llama, alpaca_file, tmp_path,
                                                                          quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "adapter"
    config = config_of(tiny_llama, alpaca_file, out, **{"model.quantization": quantization,
                                                        "data.eval_fraction": 0.25, "training.max_steps": 12})
    result = train(config)
    curve = step_losses(out)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < 0.75 * curve[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "train-config.yaml", "metrics.jsonl", "loss.png", "mtool-lineage.json"):
        assert (out / name).is_file(), name
    quantized = {} if quantization == "none" else {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, **quantized)
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = load_tokenizer(str(out))
    held_out = prepare_data(config, tokenizer).eval
    assert result.metrics["eval_loss"] == pytest.approx(eval_loss_float64(model, held_out, tokenizer.pad_token_id),
                                                        rel=1e-4)
    record = json.loads((out / "mtool-lineage.json").read_text())
    import hashlib

    assert record["operation"] == "train" and record["method"] == ("lora" if quantization == "none" else "qlora")
    assert record["parents"][0]["files"]["model.safetensors"] == \
        hashlib.sha256((tiny_llama / "model.safetensors").read_bytes()).hexdigest()
    assert record["dataset"]["sha256"] == hashlib.sha256(alpaca_file.read_bytes()).hexdigest()
    assert record["seed"] == 7 and record["metrics"]["steps"] == 12 and record["is_adapter"]


def test_accumulation_equals_one_big_batch(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    outs = {}
    for micro, accumulate in ((4, 1), (1, 4)):
        outs[micro] = tmp_path / f"mb{micro}"
        train(config_of(tiny_llama, alpaca_file, outs[micro], **{"training.micro_batch_size": micro,
                                                                 "training.grad_accum": accumulate,
                                                                 "training.max_steps": 3}))
    big, small = step_losses(outs[4]), step_losses(outs[1])
    assert small == pytest.approx(big, rel=1e-5)
    from safetensors.torch import load_file

    for name, tensor in load_file(outs[4] / "adapter_model.safetensors").items():
        torch.testing.assert_close(load_file(outs[1] / "adapter_model.safetensors")[name], tensor, atol=2e-6, rtol=1e-4)
    # step 1 sees the base model (B = 0): its loss is the token mean over the first 4 examples of the epoch
    config = config_of(tiny_llama, alpaca_file, outs[4])
    tokenizer = load_tokenizer(str(tiny_llama))
    data = prepare_data(config, tokenizer).train
    first = data.select([int(i) for i in epoch_order(len(data), config.seed, 0)[:4]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert big[0] == pytest.approx(eval_loss_float64(base, first, tokenizer.pad_token_id), rel=1e-5)


def _crash_at(monkeypatch, step_number, action):
    real_step = loop_module.train_step

    def step(loop, stop):
        if loop.progress.step == step_number:
            action()
        return real_step(loop, stop)

    monkeypatch.setattr(loop_module, "train_step", step)


def _same_as_reference(out, reference):
    from safetensors.torch import load_file

    assert step_losses(out) == step_losses(reference)  # bit for bit
    for name, tensor in load_file(reference / "adapter_model.safetensors").items():
        assert torch.equal(load_file(out / "adapter_model.safetensors")[name], tensor), name


def test_resume_after_a_crash_gives_the_uninterrupted_losses(tiny_llama, alpaca_file, tmp_path, monkeypatch,
                                                             reference_run):
    out = tmp_path / "adapter"
    config = resumable_config(tiny_llama, alpaca_file, out, every=2)

    def crash():
        raise RuntimeError("simulated crash")

    _crash_at(monkeypatch, 5, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config)
    assert not out.exists()
    assert sorted(p.name for p in config.checkpoint_dir.glob("step-*")) == ["step-000002", "step-000004"]
    monkeypatch.undo()
    train(config, resume=True)
    _same_as_reference(out, reference_run)


def test_ctrl_c_writes_a_checkpoint_and_resume_continues(tiny_llama, alpaca_file, tmp_path, monkeypatch,
                                                         reference_run):
    out = tmp_path / "adapter"
    config = resumable_config(tiny_llama, alpaca_file, out, every=0)
    _crash_at(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert [p.name for p in config.checkpoint_dir.glob("step-*")] == ["step-000003"]  # the step in flight finished
    monkeypatch.undo()
    train(config, resume=True)
    _same_as_reference(out, reference_run)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_llama, alpaca_file, tmp_path):
    out = tmp_path / "adapter"
    config = config_of(tiny_llama, alpaca_file, out, **{"training.lr": 1e30, "training.max_grad_norm": None,
                                                        "checkpoints.every": 1, "training.max_steps": 6})
    with pytest.raises(ComputeError) as caught:
        train(config)
    message = caught.value.message
    assert "became nan" in message or "became inf" in message
    newest = sorted(config.checkpoint_dir.glob("step-*"))[-1]
    assert f"the newest checkpoint ({newest}) is kept" in message
    assert not out.exists()
    state = json.loads((newest / "trainer-state.json").read_text())
    assert all(torch.isfinite(torch.tensor(row)) for row in step_losses(config.checkpoint_dir)[: state["step"]])


def test_named_chat_template_is_saved_and_new_tokens_train_in_full(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtool.chat_templates import BUILTIN_TEMPLATES

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    out = tmp_path / "adapter"
    train(config_of(tiny_llama, data, out, **{"data.chat_template": "chatml", "training.max_steps": 3}))
    assert (out / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["chatml"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_config["modules_to_save"]) == {"embed_tokens", "lm_head"}
    tokenizer = load_tokenizer(str(out))
    new_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new_id >= 384 and tokenizer.chat_template == BUILTIN_TEMPLATES["chatml"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, new_id, 6]])).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()
    lineage = json.loads((out / "mtool-lineage.json").read_text())
    assert lineage["parameters"]["added_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_cli_train_merge_and_refusals(tiny_llama, alpaca_file, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    common = ["--base", tiny_llama, "--data", alpaca_file, "--out", out, "--quantization", "none",
              "--compute-dtype", "float32", "--optimizer", "adamw", "--max-steps", "2", "--rank", "4"]
    result = run_cli("-q", "train", *common, "--merge", "--save-every", "1")
    assert str(out) in result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter-merged", dtype=torch.float32).eval()
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                        out).eval()
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert "already exists" in run_cli("train", *common, expect=3).output
    assert "checkpoints of an earlier run" in run_cli("train", *common[:5], tmp_path / "other", *common[6:],
                                                      "--save-every", "1", "--set", "checkpoints.dir=" +
                                                      str(tmp_path / "adapter-checkpoints"), expect=3).output
    assert "lora.rnak: unknown key" in run_cli("train", *common, "--set", "lora.rnak=3", expect=2).output
    assert not (tmp_path / "other").exists()


def test_packed_training_normalizes_over_the_packed_tokens(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from mtool.train.batching import group_micro_batches

    out = tmp_path / "packed"
    config = config_of(tiny_llama, alpaca_file, out, **{"data.packing": True, "training.max_steps": 5})
    train(config)
    curve = step_losses(out)
    assert curve[-1] < curve[0]
    tokenizer = load_tokenizer(str(tiny_llama))
    data = prepare_data(config, tokenizer).train
    order = epoch_order(len(data), config.seed, 0)
    first_group = group_micro_batches(order, data["length"], batch_size=4, seq_len=64, packing=True)[0]
    assert len(first_group) > 4  # more examples than a padded micro-batch holds
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert curve[0] == pytest.approx(eval_loss_float64(base, data.select(first_group), tokenizer.pad_token_id),
                                     rel=1e-5)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_losses(tiny_llama, alpaca_file, tmp_path):
    import subprocess
    import sys
    import time

    import yaml

    overrides = {"training.max_steps": 16, "checkpoints.every": 1, "lora.dropout": 0.1, "training.micro_batch_size": 2}
    reference = tmp_path / "reference"
    train(config_of(tiny_llama, alpaca_file, reference, **overrides))
    out = tmp_path / "killed"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(base_config(tiny_llama, alpaca_file, out, **overrides)))
    process = subprocess.Popen([sys.executable, "-m", "mtool.cli", "-q", "train", str(config_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = tmp_path / "killed-checkpoints"
    deadline = time.time() + 120
    while not (checkpoints / "step-000003").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not out.exists()  # killed mid-run: no output yet
    train(validate_config(yaml.safe_load(config_path.read_text()), where="test"), resume=True)
    assert step_losses(out) == step_losses(reference)
