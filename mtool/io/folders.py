"""Output folders: built beside their target and renamed into place, plus the files that travel with weights.

:func:`atomic_output_dir` builds the output in a hidden sibling folder and renames it into place only when
everything succeeded: an interrupted run leaves the target as it was, an existing target is replaced only with
``force``, and a target that is, contains or lies inside an input is always refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.errors import OutputExistsError

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
def atomic_output_dir(target: str | os.PathLike, *, force: bool = False,
                      inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target`` in one rename.

    On any exception (Ctrl-C included) the temporary folder is removed and ``target`` is untouched.
    With ``force`` an existing ``target`` is replaced, but only after the new one is complete.
    """
    target = check_output_target(target, force=force, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        umask = _current_umask()
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private (0700); an output gets the usual mode
        yield staging
        _usual_file_modes(staging, umask)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        if not force:  # appeared while we were working
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputExistsError(f"the output {target} appeared while mtool was writing it",
                                    fix="pass --force to replace it")
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
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


def card_metadata(readme: Path) -> dict[str, Any]:
    """A model card's metadata: the YAML mapping between the first two ``---`` lines of its README.md ({} when
    the file, the block or a mapping in it is missing, or the YAML does not parse)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
