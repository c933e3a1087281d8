"""FSDP2 on CPU (gloo) through torchrun: two processes sharding a QLoRA model compute the losses of one process
accumulating two micro-batches, and the FSDP run's checkpoint resumes in a single process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mtool.train.config import validate_config
from mtool.train.run import train
from tests.support.train_helpers import alpaca_records, base_config, step_losses, train_with_torchrun, write_jsonl


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_checkpoint_resumes_in_one_process(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(20))
    # QLoRA (the 4-bit weights shard as float32 storage) through the default memory modes: lean layers, fused
    # MLP and q/k/v nodes reading their sharded LoRA tensors inside the layer, chunked loss, checkpointing
    common = {"training.micro_batch_size": 2, "training.max_steps": 4, "model.quantization": "nf4",
              "model.gradient_checkpointing": True, "training.parallelism": "fsdp"}
    single = tmp_path / "single"
    train(validate_config(base_config(tiny_llama, data, single, **common, **{"training.grad_accum": 2}), where="t"))

    sharded = tmp_path / "sharded"
    fsdp_config = base_config(tiny_llama, data, sharded, **common, **{"training.grad_accum": 1, "checkpoints.every": 2})
    train_with_torchrun(fsdp_config, tmp_path / "fsdp.yaml")
    reference = step_losses(single)
    assert step_losses(sharded) == pytest.approx(reference, rel=1e-5)
    lineage = json.loads((sharded / "mtool-lineage.json").read_text())
    assert lineage["parameters"]["processes"] == 2 and lineage["parameters"]["parallelism"] == "fsdp"
    expected = load_file(single / "adapter_model.safetensors")
    written = load_file(sharded / "adapter_model.safetensors")  # gathered from the shards
    assert written.keys() == expected.keys()
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, expected[name], atol=2e-6, rtol=1e-4)

    # resume the FSDP run from its step-2 checkpoint in one process (2 micro-batches per step either way)
    checkpoints = tmp_path / "sharded-checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000002"]
    state = json.loads((checkpoints / "step-000002" / "trainer-state.json").read_text())
    assert state["world_size"] == 2
    shutil.rmtree(sharded)
    resumed = validate_config({**fsdp_config, "training": {**fsdp_config["training"], "grad_accum": 2}}, where="t")
    train(resumed, resume=True)
    assert step_losses(sharded) == pytest.approx(reference, rel=1e-5)
    for name, tensor in load_file(sharded / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], atol=2e-6, rtol=1e-4)


def test_resuming_with_other_micro_batches_per_step_is_refused(tiny_llama, tmp_path):
    from mtool.errors import ConfigError

    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(12))
    config = base_config(tiny_llama, data, tmp_path / "out", **{"training.max_steps": 2, "checkpoints.every": 1,
                                                                 "training.grad_accum": 2})
    train(validate_config(config, where="t"))
    shutil.rmtree(tmp_path / "out")
    other = validate_config({**config, "training": {**config["training"], "grad_accum": 1}}, where="t")
    with pytest.raises(ConfigError, match="micro-batches"):
        train(other, resume=True)


def test_fsdp_refuses_bitsandbytes_optimizers():
    from mtool.errors import ConfigError
    from mtool.train.config import load_config

    with pytest.raises(ConfigError, match="with training.parallelism fsdp use adamw"):
        load_config(None, {"base": "x", "training.parallelism": "fsdp", "training.optimizer": "adamw_8bit"})


def test_checkpoints_of_earlier_versions_still_resume(tiny_llama, tmp_path):
    """Before checkpoints keyed the optimizer state by parameter name, it was keyed by position."""
    import json as json_module

    from safetensors.torch import load_file

    from mtool.io.writing import save_tensors
    from mtool.train.state import flatten_state, unflatten_state

    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(16))
    config = validate_config(base_config(tiny_llama, data, tmp_path / "out", **{
        "training.max_steps": 4, "checkpoints.every": 2}), where="t")
    train(config)
    reference = step_losses(tmp_path / "out")
    folder = config.checkpoint_dir / "step-000002"
    state = unflatten_state(load_file(str(folder / "optimizer.safetensors")),
                            json_module.loads((folder / "optimizer.json").read_text()))
    order = [name for group in state["param_groups"] for name in group["params"]]
    legacy = {"state": {order.index(name): value for name, value in state["state"].items()},
              "param_groups": []}
    start = 0
    for group in state["param_groups"]:
        legacy["param_groups"].append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    tensors, tree = flatten_state(legacy)
    (folder / "optimizer.safetensors").unlink()
    save_tensors(folder, tensors, file_stem="optimizer")
    (folder / "optimizer.json").write_text(json_module.dumps(tree))
    shutil.rmtree(tmp_path / "out")
    train(config, resume=True)
    assert step_losses(tmp_path / "out") == pytest.approx(reference, rel=1e-6)
