"""Training config (file + flags, errors naming the key), learning-rate schedule, micro-batch planning."""

from __future__ import annotations

import math

import pytest
import yaml

from mtool.errors import ConfigError
from mtool.train.batching import collate, group_micro_batches, plan_steps
from mtool.train.config import TrainConfig, load_config, parse_assignment, resume_differences
from mtool.train.optim import lr_factor, warmup_steps_for


def test_file_then_flags_override_and_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"base": "m", "out": "o", "lora": {"rank": 8, "dropout": 0.1},
                                    "data": {"path": "d.jsonl"}, "model": {"liger": "off"}}))
    config = load_config(path, {"lora.rank": 32, "training.lr": 1e-4, "data.packing": None})
    assert config.lora.rank == 32 and config.lora.dropout == 0.1  # flag wins, file kept where no flag
    assert config.training.lr == 1e-4 and config.data.packing is False  # None means "flag not given"
    assert config.data.path == ["d.jsonl"]  # a single path becomes a list
    assert config.lora.resolved_alpha == 32.0  # alpha defaults to the rank
    assert config.method == "lora" if config.model.quantization == "none" else config.method == "qlora"
    assert config.checkpoint_dir.name == "o-checkpoints" and config.merged_dir.name == "o-merged"
    again = TrainConfig.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config  # the saved resolved config reproduces the run


def test_yaml_on_off_for_liger(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: m\nmodel:\n  liger: on\n")  # YAML 1.1 reads `on` as true
    assert load_config(path).model.liger == "on"


@pytest.mark.parametrize("data, key", [
    ({"base": "m", "lora": {"rnak": 4}}, "lora.rnak: unknown key"),
    ({"base": "m", "lora": {"rank": 0}}, "lora.rank: Input should be greater than 0"),
    ({"base": "m", "training": {"optimizer": "sgd"}}, "training.optimizer"),
    ({"lora": {"rank": 4}}, "base: missing"),
    ({"base": "m", "training": {"betas": [0.9, 1.5]}}, "training.betas"),
])
def test_errors_name_the_key(tmp_path, data, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert key in caught.value.message and str(path) in caught.value.message


def test_training_needs_out_and_data():
    with pytest.raises(ConfigError, match="out: missing"):
        load_config(None, {"base": "m"}).check_trainable()
    with pytest.raises(ConfigError, match="data.path: missing"):
        load_config(None, {"base": "m", "out": "o"}).check_trainable()


def test_set_assignments_are_yaml_values():
    assert parse_assignment("lora.dropout=0.05") == ("lora.dropout", 0.05)
    assert parse_assignment("lora.target_modules=[q_proj, v_proj]") == ("lora.target_modules", ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("lora.dropout")


def test_resume_differences_ignore_run_switches():
    first = load_config(None, {"base": "m", "out": "o", "checkpoints.every": 5})
    second = load_config(None, {"base": "m", "out": "o", "checkpoints.every": 50, "training.lr": 1e-3})
    assert resume_differences(first, second) == ["training.lr: 0.0002 -> 0.001"]


def test_lr_schedule_against_formulas():
    total, warmup = 110, 10
    for step in range(warmup):
        assert lr_factor(step, total_steps=total, warmup_steps=warmup, schedule="cosine") == (step + 1) / warmup
    for step in range(warmup, total):
        progress = (step - warmup) / (total - warmup)
        assert lr_factor(step, total_steps=total, warmup_steps=warmup, schedule="linear", min_ratio=0.1) == \
            pytest.approx(0.1 + 0.9 * (1 - progress))
        assert lr_factor(step, total_steps=total, warmup_steps=warmup, schedule="cosine") == \
            pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
        assert lr_factor(step, total_steps=total, warmup_steps=warmup, schedule="constant") == 1.0
    config = load_config(None, {"base": "m", "training.warmup_ratio": 0.05})
    assert warmup_steps_for(config.training, 101) == 6  # ceil(5.05)


def test_packing_groups_respect_the_token_budget():
    lengths = [30, 50, 20, 64, 10, 10, 40]
    groups = group_micro_batches(range(7), lengths, batch_size=2, seq_len=64, packing=True)
    assert [i for g in groups for i in g] == list(range(7))  # every example once, in order
    assert all(sum(lengths[i] for i in g) <= 128 for g in groups)
    assert groups == [[0, 1, 2], [3, 4, 5, 6]]  # greedy: start a new group when the next does not fit
    assert group_micro_batches(range(5), lengths, batch_size=2, seq_len=64, packing=False) == [[0, 1], [2, 3], [4]]


def test_processes_split_each_step_like_one_process_with_accumulation():
    lengths = [5] * 9
    single = plan_steps(lengths, seed=3, epochs=2, max_steps=None, batch_size=2, seq_len=8, packing=False,
                        grad_accum=2, world_size=1, rank=0)
    ranks = [plan_steps(lengths, seed=3, epochs=2, max_steps=None, batch_size=2, seq_len=8, packing=False,
                        grad_accum=1, world_size=2, rank=r) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6  # ceil(5 micro-batches / 2) per epoch
    for step in range(len(single)):
        merged = [group for pair in zip(ranks[0].steps[step], ranks[1].steps[step]) for group in pair if group]
        assert merged == single.steps[step]
    assert ranks[1].steps[2] == [[]]  # the odd last micro-batch of the epoch: rank 1 runs a masked copy
    orders = [sorted(i for groups in single.steps[e * 3:(e + 1) * 3] for g in groups for i in g) for e in range(2)]
    assert orders == [list(range(9))] * 2  # each epoch visits every example once
    capped = plan_steps(lengths, seed=3, epochs=1, max_steps=4, batch_size=2, seq_len=8, packing=False,
                        grad_accum=2, world_size=1, rank=0)
    assert len(capped) == 4 and capped.steps == single.steps[:4]  # max_steps runs into the next epoch


def test_collate_padding_and_packing_count_the_same_trained_tokens():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    padded = collate(examples, packing=False, pad_id=0)
    packed = collate(examples, packing=True, pad_id=0)
    assert padded.inputs["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded.inputs["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert packed.inputs["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert packed.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed.inputs["labels"].tolist() == [[-100, 2, 3, -100, 5]]  # no prediction across the boundary
    assert padded.trained == packed.trained == 3 and padded.tokens == packed.tokens == 5
    masked = collate(examples, packing=False, pad_id=0, masked=True)
    assert masked.trained == 0 and masked.tokens == 0


def test_example_recipes_are_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes" / "train").glob("*.yaml"))
    assert len(recipes) >= 4
    formats = {load_config(path).data.format for path in recipes}
    assert formats == {"alpaca", "chat", "prompt_completion", "text"}
    assert {load_config(path).method for path in recipes} == {"lora", "qlora"}
