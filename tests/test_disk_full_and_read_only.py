"""Full disks and read-only folders: one line (the folder, bytes needed and free), exit 5, nothing left behind.

The commands run on a real tmpfs in a mount namespace of their own (tests/support/tmpfs.py): too small for the
output, or mounted read-only. Where the machine allows no such mount the tests are skipped and say why.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from mtool.errors import DiskError
from tests.support.tmpfs import SKIP_REASON, json_of, mtool_argv, python_argv, run_on_tmpfs, unshare_prefix

needs_tmpfs = pytest.mark.skipif(unshare_prefix() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def merge_inputs(tiny, tmp_path_factory):
    base = tiny.model("llama")
    tuned = tiny.finetune(base, seed=1)
    recipe = tmp_path_factory.mktemp("recipes") / "linear.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {tuned}\n    parameters: {{weight: 0.5}}\n")
    return base, tuned, recipe


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "unexpected" not in lines[0], lines[0]
    return lines[0]


def _needed(line: str) -> int:
    """The exact byte count of ``needs 123,456 bytes``."""
    match = re.search(r"needs ([\d,]+) bytes", line)
    assert match, line
    return int(match.group(1).replace(",", ""))


def _free(line: str) -> int:
    """The exact byte count of ``123,456 bytes (123 KB) are free``."""
    match = re.search(r"([\d,]+) bytes(?: \([^)]*\))? are free", line)
    assert match, line
    return int(match.group(1).replace(",", ""))


@needs_tmpfs
def test_merge_refuses_a_disk_without_room_before_writing(merge_inputs, tmp_path: Path) -> None:
    base, _, recipe = merge_inputs
    mount = tmp_path / "small"
    run = run_on_tmpfs(mount, "size=256k", mtool_argv("-q", "merge", str(recipe), str(mount / "merged")))
    line = _one_error_line(run.stderr)
    assert run.returncode == DiskError.exit_code and run.left == []
    assert "not enough free space" in line and f"({mount})" in line
    needed, free = _needed(line), _free(line)
    assert needed > (base / "model.safetensors").stat().st_size  # the output's weights at least
    assert free <= 256 * 1024 < needed


@needs_tmpfs
def test_adapter_merge_refuses_a_disk_without_room(tiny, tmp_path: Path) -> None:
    base = tiny.model("llama")
    adapter = tiny.lora(base, rank=4)
    mount = tmp_path / "small"
    run = run_on_tmpfs(mount, "size=128k", mtool_argv("-q", "adapters", "merge", str(base), str(adapter),
                                                       str(mount / "merged")))
    line = _one_error_line(run.stderr)
    assert run.returncode == DiskError.exit_code and run.left == [] and "not enough free space" in line


@needs_tmpfs
def test_training_refuses_a_disk_without_room_before_training(tiny, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "The capital of France is Paris."}\n' * 4)
    mount = tmp_path / "small"
    run = run_on_tmpfs(mount, "size=64k", mtool_argv(
        "-q", "train", "--base", str(tiny.model("llama")), "--data", str(data), "--out", str(mount / "adapter"),
        "--quantization", "none", "--compute-dtype", "float32", "--optimizer", "adamw", "--max-steps", "50"))
    line = _one_error_line(run.stderr)
    assert run.returncode == DiskError.exit_code and "not enough free space" in line
    assert run.left == []  # not even the checkpoint folder: refused before anything is written


@needs_tmpfs
def test_a_disk_that_fills_while_writing_leaves_nothing(tmp_path: Path) -> None:
    """Past the free-space check (sizes unknown to it), the disk fills: the streaming writer's pwrite, a plain
    file write and safetensors' own writer (which PEFT uses to save adapters) all end in a DiskError."""
    mount = tmp_path / "small"
    code = f"""
import json, torch
from pathlib import Path
from safetensors.torch import save_file
from mtool.errors import DiskError
from mtool.io.folders import atomic_output_dir
from mtool.io.writing import CheckpointWriter, TensorSpec
target = Path({str(mount / 'out')!r})
writes = {{
    "pwrite": lambda s: CheckpointWriter(s, [TensorSpec("w", (1 << 20,), torch.float32)]).write("w",
                                                                                             torch.ones(1 << 20)),
    "file": lambda s: (s / "big.bin").write_bytes(b"x" * (4 << 20)),
    "safetensors": lambda s: save_file({{"w": torch.ones(1 << 20)}}, str(s / "adapter_model.safetensors")),
}}
found = {{}}
for name, write in writes.items():
    try:
        with atomic_output_dir(target) as staging:
            write(staging)
        found[name] = "written"
    except DiskError as error:
        found[name] = error.message
print(json.dumps(found))
"""
    run = run_on_tmpfs(mount, "size=1m", python_argv(code))
    assert run.returncode == 0, run.stderr
    messages = json_of(run)
    for name, message in messages.items():
        assert message.startswith("the disk filled up while writing the output"), (name, message)
        assert f"({mount})" in message and _free(message) <= 1 << 20, message
    assert run.left == []


@needs_tmpfs
@pytest.mark.parametrize("command", ["merge", "adapters-merge", "train"])
def test_a_read_only_output_folder_is_one_line(command, merge_inputs, tiny, tmp_path: Path) -> None:
    base, _, recipe = merge_inputs
    mount = tmp_path / "read-only"
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    argv = {"merge": ["merge", str(recipe), str(mount / "out")],
            "adapters-merge": ["adapters", "merge", str(base), str(tiny.lora(base, rank=4)), str(mount / "out")],
            "train": ["train", "--base", str(base), "--data", str(data), "--out", str(mount / "out"),
                      "--quantization", "none", "--max-steps", "1"]}[command]
    run = run_on_tmpfs(mount, "ro,size=1m", mtool_argv("-q", *argv))
    line = _one_error_line(run.stderr)
    assert run.returncode == DiskError.exit_code and run.left == []
    assert "read-only file system" in line and f"({mount}" in line and "write the output to a writable folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission")
def test_a_folder_without_write_permission_is_one_line(merge_inputs, tmp_path: Path, run_cli) -> None:
    _, _, recipe = merge_inputs
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = _one_error_line(run_cli("merge", str(recipe), str(locked / "out"), expect=5).stderr)
    assert "permission denied" in line and str(locked) in line


def test_disk_errors_are_told_apart_from_other_system_errors(tmp_path: Path) -> None:
    from mtool.io.folders import disk_error_of

    full = disk_error_of(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), tmp_path, 123)
    assert isinstance(full, DiskError) and "needs 123 bytes" in full.message and str(tmp_path) in full.message
    wrapped = disk_error_of(RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
                            tmp_path)
    assert isinstance(wrapped, DiskError) and "filled up" in wrapped.message
    assert disk_error_of(OSError(errno.EROFS, "Read-only file system"), tmp_path).exit_code == 5
    elsewhere = PermissionError(errno.EACCES, "Permission denied", "/some/input/model.safetensors")
    assert disk_error_of(elsewhere, tmp_path) is None  # an input it cannot read is not the output's folder
    assert disk_error_of(FileNotFoundError(errno.ENOENT, "gone", str(tmp_path / "x")), tmp_path) is None
