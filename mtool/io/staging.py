"""The hidden folders an output is built in, and the ones interrupted runs leave behind.

An output ``OUT`` is built in ``.OUT.partial-XXXXXXXX`` beside it (see :func:`mtool.io.folders.atomic_output_dir`).
While a process writes one, the folder holds a lock file, ``.mtool-writing``: the writer's pid, host and start
time, under an exclusive ``flock`` the process holds until it is done. The kernel releases the lock when the
process ends, however it ends (SIGKILL, power loss, OOM), so a later run can tell a folder being written from one
left by a dead process: if it can take the lock itself, nobody is writing. Such stale folders are removed by the
next run of any command into the same output and listed by ``mtool info OUT``.

``.OUT.old-XXXXXXXX`` holds the previous output for the moment between the two renames of a ``--force``
replacement; left over, it is stale once ``OUT`` exists again (the replacement completed) and kept otherwise (it
then holds the only copy of the previous output).

A partial folder without a lock file (its writer died between creating it and locking it, or it comes from an
older mtool) counts as stale once it has not changed for an hour.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".mtool-writing"
UNLOCKED_GRACE_S = 3600.0


def partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def retired_prefix(target: Path) -> str:
    return f".{target.name}.old-"


@dataclass(frozen=True)
class LeftoverFolder:
    """A hidden build folder beside an output: whose it is and whether it is stale."""

    path: Path
    kind: str  # "partial" (an output being built) or "old" (a replaced output on its way out)
    pid: int | None
    host: str | None
    stale: bool

    def describe(self) -> str:
        owner = f"process {self.pid} on {self.host}" if self.pid is not None else "an unknown process"
        state = "stale: its writer is gone" if self.stale else "in use"
        return f"{self.path.name} ({self.kind}, written by {owner}; {state}; {folder_bytes(self.path):,} bytes)"


class WriterLock:
    """The lock file of a folder being written: created, filled with the writer's identity and ``flock``-ed."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        # locked and filled under another name, then renamed: a lock file that can be seen is always locked
        pending = folder / f"{LOCK_NAME}.{os.getpid()}"
        self._fd: int | None = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        with contextlib.suppress(OSError):  # a file system without flock: the pid still identifies the writer
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.write(self._fd, json.dumps(record).encode())
        os.rename(pending, self.path)

    def release(self) -> None:
        """Remove the lock file (before the folder is renamed into place) and let the lock go."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _lock_state(folder: Path) -> tuple[int | None, str | None, bool]:
    """``(pid, host, alive)`` of the writer of ``folder`` per its lock file (module docstring)."""
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            return None, None, time.time() - folder.stat().st_mtime < UNLOCKED_GRACE_S
        return None, None, False
    except OSError:
        return None, None, True  # unreadable: leave it alone
    try:
        try:
            record = json.loads(os.read(fd, 4096) or b"{}")
            pid, host = int(record.get("pid")), str(record.get("host"))[:100]
        except (ValueError, TypeError, AttributeError):
            pid, host = None, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return pid, host, True
        except OSError as error:  # no flock here: judge by the pid on this host, keep what another host writes
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL) or pid is None:
                return pid, host, True
            return pid, host, host != socket.gethostname() or _process_exists(pid)
        return pid, host, False
    finally:
        os.close(fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_folders(target: Path) -> list[LeftoverFolder]:
    """The hidden build folders of ``target`` in its parent folder, stale or in use, sorted by name."""
    parent = target.parent
    if not parent.is_dir():
        return []
    found = []
    prefixes = (("partial", partial_prefix(target)), ("old", retired_prefix(target)))
    with contextlib.suppress(OSError):
        for child in sorted(parent.iterdir()):
            for kind, prefix in prefixes:
                if child.name.startswith(prefix) and child.is_dir() and not child.is_symlink():
                    pid, host, alive = _lock_state(child)
                    if kind == "old":
                        alive = not target.exists()  # until the replacement is in place, it is the only copy
                    found.append(LeftoverFolder(child, kind, pid, host, stale=not alive))
    return found


def remove_stale_folders(target: Path) -> list[LeftoverFolder]:
    """Remove the stale build folders of ``target`` (module docstring); returns those removed."""
    removed = []
    for leftover in leftover_folders(target):
        if leftover.stale:
            shutil.rmtree(leftover.path, ignore_errors=True)
            if not leftover.path.exists():
                removed.append(leftover)
    return removed


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (what a leftover occupies)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
