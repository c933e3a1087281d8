"""The checkpoint layer: lazy reading, the streaming writer, atomic output folders, unsafe and broken files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtool.errors import CheckpointError, OutputExistsError, UnsafeWeightsError
from mtool.io.folders import atomic_output_dir, copy_support_files
from mtool.io.reading import open_checkpoint
from mtool.io.writing import CheckpointWriter, TensorSpec, plan_shards, save_tensors


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 6, generator=generator),
        "model.norm.weight": torch.randn(6, generator=generator).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=generator).to(torch.float16),
        "odd_bf16": torch.randn(7, generator=generator).to(torch.bfloat16),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "int8": torch.tensor([-3, 4], dtype=torch.int8),
        "scalar": torch.tensor(2.5),
        "double": torch.randn(2, 2, generator=generator, dtype=torch.float64),
    }


def test_single_shard_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    (tmp_path / "ours").mkdir()
    files = save_tensors(tmp_path / "ours", tensors)
    assert [f.name for f in files] == ["model.safetensors"]
    assert files[0].read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_write_order_does_not_change_bytes(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    outputs = []
    for attempt in range(2):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        names = list(tensors)
        random.Random(attempt).shuffle(names)
        with CheckpointWriter(folder, specs, max_shard_bytes=120) as writer:
            for name in names:
                writer.write(name, tensors[name])
        outputs.append({f.name: f.read_bytes() for f in sorted(folder.iterdir())})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > 2  # several shards and the index


def test_read_single_and_sharded_folders(tiny) -> None:
    for folder in (tiny.model("llama"), tiny.model("qwen2", tie=True, shards=3)):
        checkpoint = open_checkpoint(folder)
        expected: dict[str, torch.Tensor] = {}
        for file in checkpoint.weight_files:
            expected.update(load_file(file))
        assert sorted(checkpoint.names) == sorted(expected)
        for name, tensor in expected.items():
            info = checkpoint.info(name)
            assert info.shape == tuple(tensor.shape) and info.dtype == tensor.dtype
            assert torch.equal(checkpoint.read(name), tensor)
        assert checkpoint.parameter_count() == sum(t.numel() for t in expected.values())
    assert len(open_checkpoint(tiny.model("qwen2", tie=True, shards=3)).weight_files) == 3


def test_sharded_output_loads_in_transformers(tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny.model("mistral")
    checkpoint = open_checkpoint(source)
    specs = [TensorSpec(n, checkpoint.info(n).shape, checkpoint.info(n).dtype) for n in checkpoint.names]
    out = tmp_path / "resharded"
    out.mkdir()
    with CheckpointWriter(out, specs, max_shard_bytes=checkpoint.total_bytes() // 4) as writer:
        for name in reversed(checkpoint.names):
            writer.write(name, checkpoint.read(name))
    copy_support_files(source, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4
    assert index["metadata"]["total_size"] == checkpoint.total_bytes()
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    resharded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, resharded(ids).logits)


def test_plan_shards_cuts_by_size_and_isolates_giants() -> None:
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 100, 5, 5])]
    groups = plan_shards(specs, max_shard_bytes=80)
    assert [[s.name for s in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_writer_rejects_wrong_shape_unannounced_and_missing(tmp_path: Path) -> None:
    spec = TensorSpec("a", (2, 2), torch.float32)
    writer = CheckpointWriter(tmp_path, [spec, TensorSpec("b", (1,), torch.float32)])
    with pytest.raises(CheckpointError, match="announced as"):
        writer.write("a", torch.zeros(4))
    with pytest.raises(CheckpointError, match="not announced"):
        writer.write("c", torch.zeros(1))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="written twice"):
        writer.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="never written"):
        writer.close()


_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from mtool.io.reading import open_checkpoint
    from mtool.io.writing import CheckpointWriter, TensorSpec
    folder, count, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.ones(1) + 1  # warm up the allocator and kernels before the baseline
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    specs = [TensorSpec(f"layer{i}.weight", (rows, 4096), torch.float32) for i in range(count)]
    with CheckpointWriter(folder, specs, max_shard_bytes=300 * 1000**2) as writer:
        for i, spec in enumerate(specs):
            writer.write(spec.name, torch.full(spec.shape, float(i)))
    after_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checkpoint = open_checkpoint(folder)
    for i, name in enumerate(checkpoint.names):
        assert checkpoint.read(name)[0, 0].item() == float(int(name[5:].split(".")[0]))
    after_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(baseline, after_write, after_read)
    """
)


@pytest.mark.slow
def test_peak_memory_writing_and_reading_1gb_stays_near_one_tensor(tmp_path: Path) -> None:
    count, rows = 16, 4096  # 16 tensors of 64 MiB = 1 GiB
    tensor_kib = rows * 4096 * 4 // 1024
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), str(count), str(rows)],
                            capture_output=True, text=True, check=True)
    baseline, after_write, after_read = (int(v) for v in result.stdout.split())  # KiB
    assert sum(f.stat().st_size for f in tmp_path.glob("*.safetensors")) > count * tensor_kib * 1024
    assert after_write - baseline < 2.5 * tensor_kib, (baseline, after_write)
    assert after_read - baseline < 2.5 * tensor_kib, (baseline, after_read)


def test_interrupted_write_leaves_no_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_output_dir(target) as staging:
            specs = [TensorSpec(f"t{i}", (4,), torch.float32) for i in range(4)]
            with CheckpointWriter(staging, specs) as writer:
                writer.write("t0", torch.zeros(4))
                raise RuntimeError("half-way")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_force_and_inputs_are_protected(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(target):
            pass
    assert (target / "keep.txt").read_text() == "old"
    with pytest.raises(RuntimeError):  # a failed forced run keeps the old output
        with atomic_output_dir(target, force=True):
            raise RuntimeError("boom")
    assert (target / "keep.txt").read_text() == "old"
    with atomic_output_dir(target, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    model = tmp_path / "model"
    model.mkdir()
    for bad_target in (model, model / "sub", tmp_path):
        with pytest.raises(OutputExistsError, match="overwrite the input"):
            with atomic_output_dir(bad_target, force=True, inputs=[model]):
                pass
    assert model.is_dir()


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not even looked at")
    (folder / "config.json").write_text("{}")
    with pytest.raises(UnsafeWeightsError, match="arbitrary code") as caught:
        open_checkpoint(folder)
    assert "safetensors" in caught.value.message and "weights_only=True" in caught.value.message
    with pytest.raises(UnsafeWeightsError):
        open_checkpoint(folder / "pytorch_model.bin")


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated") as caught:
        open_checkpoint(truncated)
    assert "truncated.safetensors" in caught.value.message
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(data[:8] + b"\xff" * 40 + data[48:])
    with pytest.raises(CheckpointError, match="corrupt"):
        open_checkpoint(garbage)
    tiny_file = tmp_path / "tiny.safetensors"
    tiny_file.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        open_checkpoint(tiny_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        open_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")


def test_missing_shard_named_in_index(tiny, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny.model("llama", shards=2), folder)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(folder)


def test_copy_support_files(tiny, tmp_path: Path) -> None:
    copied = copy_support_files(tiny_model := tiny.model("llama"), tmp_path)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(copied)
    assert (tmp_path / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    only_tokenizer = tmp_path / "tok"
    only_tokenizer.mkdir()
    assert "config.json" not in copy_support_files(tiny_model, only_tokenizer, config=False)


def test_output_folder_gets_the_mode_of_an_ordinary_mkdir(tmp_path: Path) -> None:
    reference = tmp_path / "made-by-mkdir"
    reference.mkdir()
    with atomic_output_dir(tmp_path / "out") as staging:
        (staging / "file.txt").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_files_of_an_output_get_the_usual_mode_even_when_a_writer_makes_them_private(tmp_path: Path) -> None:
    import os

    with atomic_output_dir(tmp_path / "out") as staging:
        (staging / "weights.safetensors").write_bytes(b"x")
        os.chmod(staging / "weights.safetensors", 0o600)  # as safetensors' writer leaves PEFT's adapter files
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    assert (tmp_path / "out" / "weights.safetensors").stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
