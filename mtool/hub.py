"""Models named by users: a local folder, or a Hugging Face Hub id found in the cache or downloaded.

A name that exists on disk is a folder. A name that cannot be a Hub id (``./x``, ``a/b/c``, ``~/x``, one whose
first part is an existing folder, or one the Hub's id rules refuse) is a missing folder. Anything else is a Hub id:
looked up in the local Hugging Face cache, then downloaded unless ``HF_HUB_OFFLINE`` is set. Every failure is one
line: what was looked for, where, and what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mtool.errors import InputError
from mtool.ui import quiet_logger

# What a model needs beside its weights; nothing else (pickles, images) is ever fetched.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]


@dataclass(frozen=True)
class ModelRef:
    """A model named by a user: a local folder or a Hub id, with an optional revision."""

    id: str
    path: Path
    revision: str | None = None
    is_hub: bool = False


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` can only be meant as a Hub id: ``owner/name`` by the Hub's rules, and not the path of a
    folder whose parent exists here (``my-models/symbols`` with a ``my-models`` folder is a local path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if reference.count("/") != 1 or reference.startswith((".", "/", "~")) or "\\" in reference:
        return False
    if Path(reference.split("/")[0]).is_dir():
        return False
    try:
        validate_repo_id(reference)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _download_failure(reference: str, revision: str | None, error: Exception) -> InputError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return InputError("the model is gated: its terms must be accepted first", where=reference,
                          fix=f"accept them on https://huggingface.co/{reference} and log in with `hf auth login`")
    if isinstance(error, RevisionNotFoundError):
        return InputError(f"the Hub has no revision {revision!r} of the model", where=reference,
                          fix="check the revision (a branch, tag or commit of the repository)")
    if isinstance(error, RepositoryNotFoundError):
        return InputError("no such model on the Hub (or it is private)", where=reference,
                          fix="check the id; for a private model log in with `hf auth login`; for a local folder "
                              "give its path")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return InputError(f"cannot download the model from the Hugging Face Hub ({type(error).__name__}: {reason})",
                      where=reference, fix="check your network, or download it elsewhere and give its folder")


def resolve_model(reference: str, revision: str | None = None, *, download: bool | None = None) -> ModelRef:
    """Find a model: a local path first, then the Hugging Face cache, then (when allowed) the Hub.

    ``download`` defaults to "yes unless ``HF_HUB_OFFLINE`` is set". Only safetensors weights, JSON
    files and tokenizer files are fetched.
    """
    local = Path(reference).expanduser()
    if local.exists():
        return ModelRef(id=str(local), path=local, revision=revision, is_hub=False)
    if not is_hub_id(reference):
        raise InputError("no such model folder", where=str(local.absolute()),
                         fix="check the path (a relative path starts from the current folder); a Hub model is "
                             "named owner/name")
    if download is None:
        download = not offline()
    from huggingface_hub import snapshot_download

    with quiet_logger("huggingface_hub"):  # it logs each failed connection; mtool reports the failure once
        try:
            folder = snapshot_download(reference, revision=revision, allow_patterns=HUB_PATTERNS,
                                       local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not cached"
            folder = None
        if folder is None and download:
            try:
                folder = snapshot_download(reference, revision=revision, allow_patterns=HUB_PATTERNS)
            except Exception as error:  # noqa: BLE001 - reported as one line
                raise _download_failure(reference, revision, error) from None
    if folder is None:
        raise InputError(f"model not found: there is no folder {local.absolute()} and the Hub id is not in the "
                         "Hugging Face cache (downloads are off: HF_HUB_OFFLINE is set)", where=reference,
                         fix=f"give the model's folder, or download it first with `hf download {reference}`")
    return ModelRef(id=reference, path=Path(folder), revision=revision, is_hub=True)
