"""Models named by users: a local folder, or a Hugging Face Hub id found in the cache or downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mtool.errors import InputError

# What a model needs beside its weights; nothing else (pickles, images) is ever fetched.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]


@dataclass(frozen=True)
class ModelRef:
    """A model named by a user: a local folder or a Hub id, with an optional revision."""

    id: str
    path: Path
    revision: str | None = None
    is_hub: bool = False


def resolve_model(reference: str, revision: str | None = None, *, download: bool | None = None) -> ModelRef:
    """Find a model: a local path first, then the Hugging Face cache, then (when allowed) the Hub.

    ``download`` defaults to "yes unless ``HF_HUB_OFFLINE`` is set". Only safetensors weights, JSON
    files and tokenizer files are fetched.
    """
    local = Path(reference).expanduser()
    if local.exists():
        return ModelRef(id=str(local), path=local, revision=revision, is_hub=False)
    if reference.count("/") != 1 or reference.startswith((".", "/", "~")):
        raise InputError("model not found", where=reference, fix="give an existing folder or a Hub id like owner/name")
    if download is None:
        download = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(reference, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        folder = None
    if folder is None and download:
        try:
            folder = snapshot_download(reference, revision=revision, allow_patterns=HUB_PATTERNS)
        except Exception as error:  # noqa: BLE001
            raise InputError(f"cannot download the model: {error}", where=reference,
                             fix="check the id and your network, or download it and pass the folder") from None
    if folder is None:
        raise InputError("model is neither a local folder nor in the Hugging Face cache", where=reference,
                         fix="download it first (`hf download ID`) or pass a local folder")
    return ModelRef(id=reference, path=Path(folder), revision=revision, is_hub=True)
