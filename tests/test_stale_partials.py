"""Hidden build folders (``.OUT.partial-*``) of killed runs: listed by ``mtool info``, removed by the next run into
the same output, while the folder of a run still writing is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtool.io.folders import atomic_output_dir
from mtool.io.staging import LOCK_NAME, UNLOCKED_GRACE_S, leftover_folders, remove_stale_folders

REPO = Path(__file__).resolve().parents[1]
WRITER = """
import sys, time
from pathlib import Path
from mtool.io.folders import atomic_output_dir
with atomic_output_dir(Path(sys.argv[1])) as staging:
    (staging / "model.safetensors").write_bytes(b"half a model")
    print(staging, flush=True)
    time.sleep(600)
"""


def _start_writer(target: Path) -> tuple[subprocess.Popen, Path]:
    """A process building ``target``; returns it and its hidden build folder once it is writing."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    staging = Path(process.stdout.readline().strip())
    assert staging.name.startswith(f".{target.name}.partial-") and (staging / LOCK_NAME).is_file()
    return process, staging


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture
def killed_run(tmp_path: Path):
    """The build folder a SIGKILLed run left for ``tmp_path / "merged"``, with its pid."""
    target = tmp_path / "merged"
    process, staging = _start_writer(target)
    _kill(process)
    return target, staging, process.pid


def test_a_killed_run_leaves_a_stale_folder_that_info_lists(killed_run, run_cli) -> None:
    target, staging, pid = killed_run
    [leftover] = leftover_folders(target)
    assert leftover.path == staging and leftover.pid == pid and leftover.stale and leftover.kind == "partial"
    result = run_cli("info", target, expect=2)  # the output itself was never written
    line = result.stderr.strip()
    assert line.startswith("error: no such file or folder, but 1 hidden build folder") and "\n" not in line
    assert staging.name in line and f"process {pid}" in line and "stale" in line


def test_the_next_run_into_the_same_output_removes_it(killed_run, tiny, tmp_path: Path, run_cli) -> None:
    target, staging, _ = killed_run
    base = tiny.model("llama")
    adapter = tiny.lora(base, rank=4)
    result = run_cli("adapters", "merge", base, adapter, target)
    assert f"removed {staging}, left by an interrupted run" in result.stderr
    assert not staging.exists() and target.is_dir() and leftover_folders(target) == []
    assert not (target / LOCK_NAME).exists()  # the lock file never travels with the output


def test_a_folder_still_being_written_is_listed_in_use_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    process, staging = _start_writer(target)
    try:
        [leftover] = leftover_folders(target)
        assert not leftover.stale and leftover.pid == process.pid
        assert remove_stale_folders(target) == [] and staging.is_dir()
        with atomic_output_dir(target, force=True) as other:  # another run into the same output
            (other / "x").write_text("1")
        assert staging.is_dir() and target.is_dir()
    finally:
        _kill(process)
    [leftover] = leftover_folders(target)
    assert leftover.stale  # its writer is gone now


def test_info_lists_leftovers_beside_an_existing_output(killed_run, tmp_path: Path, run_cli) -> None:
    target, staging, pid = killed_run
    target.mkdir()  # an earlier output (an empty safetensors file) beside the killed run's build folder
    (target / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    result = run_cli("info", target)
    assert f"leftover: {staging.name} (partial, written by process {pid}" in result.output
    summary = json.loads(run_cli("info", target, "--json").output)
    assert len(summary["leftovers"]) == 1 and "stale" in summary["leftovers"][0]


def test_folders_without_a_lock_and_replaced_outputs(tmp_path: Path) -> None:
    target = tmp_path / "out"
    fresh = tmp_path / ".out.partial-fresh"  # a writer between creating its folder and locking it
    old = tmp_path / ".out.partial-old"  # from a run that died there long ago (or an older mtool)
    for folder in (fresh, old):
        folder.mkdir()
    long_ago = time.time() - UNLOCKED_GRACE_S - 60
    os.utime(old, (long_ago, long_ago))
    retired = tmp_path / ".out.old-abc"  # a --force replacement killed between its two renames
    (retired / "out").mkdir(parents=True)
    assert {f.path.name: f.stale for f in leftover_folders(target)} == {
        ".out.old-abc": False, ".out.partial-fresh": False, ".out.partial-old": True}
    assert [f.path.name for f in remove_stale_folders(target)] == [".out.partial-old"]
    assert retired.is_dir()  # the only copy of the previous output while OUT is missing
    target.mkdir()
    assert [f.path.name for f in remove_stale_folders(target)] == [".out.old-abc"]
    assert fresh.is_dir()
