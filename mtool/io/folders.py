"""Output folders: built beside their target and renamed into place, plus the files that travel with weights.

:func:`atomic_output_dir` builds the output in a hidden sibling folder and renames it into place only when
everything succeeded: an interrupted run leaves the target as it was, an existing target is replaced only with
``force``, and a target that is, contains or lies inside an input is always refused. The hidden folder carries a
lock file while it is written, so the next run into the same output removes those left by dead processes
(:mod:`mtool.io.staging`).

The disk is checked before and while writing: when the caller knows the output's size, the free space of the
target's file system must hold it before anything is written; a read-only or unwritable folder, or a disk that
fills up anyway, ends the command with a :class:`~mtool.errors.DiskError` naming the folder, the bytes needed
(when known) and the bytes free, with the partial output removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool import ui
from mtool.errors import DiskError, MtoolError, OutputExistsError
from mtool.io.staging import WriterLock, partial_prefix, remove_stale_folders, retired_prefix
from mtool.sizes import format_byte_size

if TYPE_CHECKING:
    import torch

# Files that travel with the weights: model config, generation defaults, tokenizer, chat template.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_target(target: str | os.PathLike, *, force: bool, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse a target that exists (unless ``force``) or that is, contains or lies inside an input."""
    target = Path(target).resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if _is_within(source_path, target) or _is_within(target, source_path):
            raise OutputExistsError(f"the output {target} would overwrite the input {source_path}",
                                    fix="choose an output folder outside every input")
    if target.exists() and not force:
        raise OutputExistsError(f"the output {target} already exists",
                                fix="choose another path or pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"the output {target} exists and is not a folder", fix="choose another path")
    return target


def _current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (another thread may be creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = (),
                      needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target`` in one rename.

    On any exception (Ctrl-C included) the temporary folder is removed and ``target`` is untouched.
    With ``force`` an existing ``target`` is replaced, but only after the new one is complete. Stale build folders
    of ``target`` left by dead processes are removed first. ``needed_bytes`` (the output's size, when known) is
    checked against the free space before anything is written.
    """
    target = check_output_target(target, force=force, inputs=inputs)
    parent = target.parent
    with disk_errors(parent, needed_bytes):
        parent.mkdir(parents=True, exist_ok=True)
        for leftover in remove_stale_folders(target):
            ui.info(f"removed {leftover.path}, left by an interrupted run")
        if needed_bytes is not None:
            require_free_space(parent, needed_bytes)
        staging = Path(tempfile.mkdtemp(prefix=partial_prefix(target), dir=parent))
    lock = None
    try:
        with disk_errors(parent, needed_bytes):
            lock = WriterLock(staging)
            umask = _current_umask()
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private (0700); an output gets the usual mode
            yield staging
            _usual_file_modes(staging, umask)
            lock.release()
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        if not force:  # appeared while we were working
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputExistsError(f"the output {target} appeared while mtool was writing it",
                                    fix="pass --force to replace it")
        retired = Path(tempfile.mkdtemp(prefix=retired_prefix(target), dir=parent))
        os.rename(target, retired / target.name)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, target)


def _usual_file_modes(folder: Path, umask: int) -> None:
    """Give every file of an output the mode an ordinary file gets (some writers, such as safetensors' through
    PEFT's save_pretrained, create theirs private)."""
    usual = 0o666 & ~umask
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != usual:
            os.chmod(path, usual)


# errno values that mean "this folder cannot take the output", and how each is told
_DISK_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
# the same failures as libraries that wrap them report them (safetensors' Rust writer: "... StorageFull ...")
_DISK_TEXTS = {"No space left": errno.ENOSPC, "StorageFull": errno.ENOSPC, "os error 28": errno.ENOSPC,
               "Disk quota exceeded": errno.EDQUOT, "os error 122": errno.EDQUOT,
               "Read-only file system": errno.EROFS, "os error 30": errno.EROFS}


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent, for a folder still to be
    made), for an unprivileged user; None when it cannot be told."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def require_writable(folder: Path) -> None:
    """Raise :class:`DiskError` when ``folder`` (or, for a folder still to be made, its nearest existing parent)
    is on a read-only file system or not writable by this process (for commands that write only at the end)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return
    if read_only:
        raise disk_error_of(OSError(errno.EROFS, "Read-only file system", str(folder)), folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise disk_error_of(PermissionError(errno.EACCES, "Permission denied", str(folder)), folder)


def require_free_space(folder: Path, needed: int) -> None:
    """Raise :class:`DiskError` unless the file system of ``folder`` has ``needed`` bytes free."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise DiskError(f"not enough free space for the output: it needs {format_byte_size(needed)}, "
                        f"{format_byte_size(free)} are free", where=str(folder),
                        fix="free some space or write the output to another disk")


def disk_error_of(error: BaseException, folder: Path, needed: int | None = None) -> DiskError | None:
    """The :class:`DiskError` that ``error`` amounts to (full disk, read-only or unwritable folder), else None."""
    if isinstance(error, MtoolError):
        return None
    code = error.errno if isinstance(error, OSError) else None
    if code in (errno.EACCES, errno.EPERM) and not _names_a_path_in(error, folder):
        return None  # permission denied on something else (an input): not about the output
    if code not in _DISK_ERRNOS and not isinstance(error, OSError):
        text = str(error)[:2000]
        code = next((value for marker, value in _DISK_TEXTS.items() if marker in text), None)
    if code not in _DISK_ERRNOS:
        return None
    free = free_bytes(folder)
    if code in (errno.ENOSPC, errno.EDQUOT):
        need = f"it needs {format_byte_size(needed)}, " if needed is not None else ""
        have = f"{format_byte_size(free)} are free" if free is not None else "the free space is unknown"
        return DiskError(f"the disk filled up while writing the output ({_DISK_ERRNOS[code]}): {need}{have}",
                         where=str(folder), fix="free some space or write the output to another disk; nothing "
                                                "was left behind")
    if code == errno.EROFS:
        return DiskError("cannot write the output: the folder is on a read-only file system", where=str(folder),
                         fix="write the output to a writable folder")
    return DiskError("cannot write the output: permission denied", where=str(folder),
                     fix="write the output to a folder you may write to, or change its permissions")


def _names_a_path_in(error: OSError, folder: Path) -> bool:
    """Whether the error is about ``folder``, something inside it, or a folder above it being created."""
    names = [Path(os.fsdecode(name)).absolute() for name in (error.filename, error.filename2) if name]
    folder = folder.absolute()
    return any(_is_within(name, folder) or _is_within(folder, name) for name in names)


@contextlib.contextmanager
def disk_errors(folder: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk or an unwritable ``folder`` met inside the block into a :class:`DiskError`."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - only the disk failures are translated; the rest passes as it is
        translated = disk_error_of(error, folder, needed)
        if translated is None:
            raise
        raise translated from None


RECORD_ALLOWANCE = 256 * 1024  # the lineage record and the card, written last


def support_files_bytes(source: str | os.PathLike, *, config: bool = True, tokenizer: bool = True) -> int:
    """Bytes of the files :func:`copy_support_files` would copy from ``source`` (for the free-space check)."""
    source = Path(source)
    if source.is_file():
        source = source.parent
    wanted = (CONFIG_FILES if config else ()) + (TOKENIZER_FILES if tokenizer else ())
    total = 0
    for filename in wanted:
        with contextlib.suppress(OSError):
            total += (source / filename).stat().st_size
    return total


def copy_support_files(source: str | os.PathLike, destination: str | os.PathLike, *,
                       config: bool = True, tokenizer: bool = True) -> list[str]:
    """Copy config/generation config and/or tokenizer + chat template files that exist in ``source``."""
    source, destination = Path(source), Path(destination)
    if source.is_file():
        source = source.parent
    wanted = (CONFIG_FILES if config else ()) + (TOKENIZER_FILES if tokenizer else ())
    copied = []
    for filename in wanted:
        if (source / filename).is_file():
            shutil.copyfile(source / filename, destination / filename)
            copied.append(filename)
    return copied


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as indented JSON with a final newline (how model configs are written)."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def set_config_dtype(config: dict[str, Any], dtype: "torch.dtype") -> dict[str, Any]:
    """Record the weights' dtype in a model config as transformers 5 writes it (``dtype``, not ``torch_dtype``)."""
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return config


def card_metadata(readme: Path, *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """A model card's metadata: the YAML mapping between the first two ``---`` lines of its README.md, read from
    its first ``max_bytes`` within :mod:`mtool.safe_yaml`'s limits (a card is an input like any other); {} when the
    file, the block or a mapping in it is missing or unreadable."""
    from mtool.safe_yaml import markdown_front_matter

    try:
        with open(readme, "rb") as handle:
            text = handle.read(max_bytes).decode("utf-8", errors="replace")
    except OSError:
        return {}
    return markdown_front_matter(text, source=str(readme))
