"""Commands run on a small tmpfs (a full disk, a read-only file system) in a mount namespace of their own.

``unshare -m`` (as root) or ``unshare -rm`` (an unprivileged user namespace) gives the command a private mount
table: the tmpfs is mounted there, the command runs, what is left on the tmpfs is listed, and everything goes away
with the process; nothing is mounted on the machine itself. Where neither is allowed the tests are skipped with a
message saying so.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LISTING = "::left on the tmpfs::"
_SCRIPT = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; shift 2; "$@"; rc=$?; echo "' + LISTING + \
    '"; ls -A "$MOUNT_POINT"; exit $rc'


@functools.cache
def unshare_prefix() -> list[str] | None:
    """The command prefix that gives a private mount namespace here, or None when none works."""
    if shutil.which("unshare") is None:
        return None
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"mtool-tmpfs-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        for prefix in (["unshare", "-m"], ["unshare", "-rm"]) if os.geteuid() == 0 else (["unshare", "-rm"],):
            result = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0" && umount "$0"',
                                     str(probe)], capture_output=True, timeout=30)
            if result.returncode == 0:
                return prefix
        return None
    finally:
        probe.rmdir()


SKIP_REASON = "cannot mount a tmpfs here (needs root or unprivileged user namespaces for `unshare -rm`)"


@dataclass(frozen=True)
class TmpfsRun:
    returncode: int
    stdout: str
    stderr: str
    left: list[str]  # what was on the tmpfs after the command


def run_on_tmpfs(mount_point: Path, options: str, argv: list[str], *, env: dict[str, str] | None = None,
                 timeout: float = 300) -> TmpfsRun:
    """Mount a tmpfs with ``options`` (``size=256k``, ``ro,size=1m``) on ``mount_point`` in a namespace of its own,
    run ``argv`` there, and report its exit code, output and what it left on the tmpfs."""
    prefix = unshare_prefix()
    assert prefix is not None, SKIP_REASON
    mount_point.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MOUNT_POINT": str(mount_point),
                   **(env or {})}
    result = subprocess.run([*prefix, "sh", "-c", _SCRIPT, "sh", options, str(mount_point), *argv],
                            capture_output=True, text=True, env=environment, timeout=timeout)
    assert result.returncode != 97, f"mounting the tmpfs failed: {result.stderr}"
    stdout, _, listing = result.stdout.partition(LISTING)
    return TmpfsRun(result.returncode, stdout, result.stderr, listing.split())


def mtool_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtool.cli", *args]


def python_argv(code: str) -> list[str]:
    """Python code run inside the namespace; it prints a JSON line, read back with :func:`json_of`."""
    return [sys.executable, "-c", code]


def json_of(run: TmpfsRun) -> dict:
    return json.loads(run.stdout.strip().splitlines()[-1])
