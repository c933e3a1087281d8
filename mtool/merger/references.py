"""Model references as recipes write them: ``path_or_hub_id[@revision][+adapter_path_or_hub_id]``, where ``+``
applies a LoRA adapter to the model on the fly (also mergekit's expanded form ``{model: {path: ...}, lora: ...}``).
A reference longer than a path can be, or with a NUL character, names nothing and is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer

from mtool.errors import shown

MAX_REFERENCE_CHARS = 4096  # PATH_MAX on Linux: a longer path or Hub id names nothing


class ModelReference(BaseModel):
    """``model[@revision][+adapter]`` as written in a recipe."""

    model_config = ConfigDict(frozen=True)

    model: str
    revision: str | None = None
    adapter: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelReference":
        text = str(text).strip()
        if not text:
            raise ValueError("empty model reference")
        _check_reference_text(text)
        model, _, adapter = text.partition("+")
        revision = None
        if "@" in model and not _exists(model):
            model, _, revision = model.rpartition("@")
        return cls(model=model, revision=revision or None, adapter=adapter or None)

    @model_serializer
    def _as_text(self) -> str:
        return str(self)

    def __str__(self) -> str:
        text = self.model + (f"@{self.revision}" if self.revision else "")
        return text + (f"+{self.adapter}" if self.adapter else "")


def _check_reference_text(text: str) -> None:
    if len(text) > MAX_REFERENCE_CHARS or "\0" in text:
        raise ValueError(f"a model reference is a path or a Hub id (at most {MAX_REFERENCE_CHARS} characters, no "
                         f"NUL character), got {len(text):,} characters: {shown(text, 60)}")


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, or unreadable: not an existing path
        return False


def as_reference(value: Any) -> ModelReference:
    """A recipe's model entry as a :class:`ModelReference`: a string, or mergekit's expanded mapping
    (ValueError, which pydantic reports with the recipe line, for anything else)."""
    if isinstance(value, ModelReference):
        return value
    if isinstance(value, dict) and "model" in value:  # mergekit's expanded form {model: {path: ...}, lora: ...}
        model = value["model"]
        path = model.get("path") if isinstance(model, dict) else model
        revision = model.get("revision") if isinstance(model, dict) else None
        lora = value.get("lora")
        adapter = lora.get("path") if isinstance(lora, dict) else lora
        if not isinstance(path, str) or not isinstance(revision, (str, type(None))) \
                or not isinstance(adapter, (str, type(None))):
            raise ValueError(f"a model reference's path, revision and lora must be strings, got {shown(value)}")
        for part in (path, revision, adapter):
            _check_reference_text(part or "")
        return ModelReference(model=path, revision=revision, adapter=adapter)
    if not isinstance(value, str):
        raise ValueError(f"a model reference must be a string, got {shown(value)}")
    return ModelReference.parse(value)


def reference_text(value: Any, keywords: tuple[str, ...] = ()) -> Any:
    """A string naming a model (or one of ``keywords``), checked as a model reference."""
    if isinstance(value, str) and value not in keywords:
        ModelReference.parse(value)
    return value
