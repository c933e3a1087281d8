"""What a hostile case is, and the helpers its builders use to write inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Env:
    """What a case may use: a fresh folder of its own, and read-only shared inputs (a tiny model, an adapter)."""

    root: Path
    base: Path  # a tiny Llama model folder (float32, one shard)
    adapter: Path  # a PEFT LoRA adapter of ``base``: rank 4, lora_alpha 8, q_proj and v_proj

    @property
    def out(self) -> Path:
        return self.root / "out"


@dataclass(frozen=True)
class Run:
    """One command to run: its arguments, the inputs it must leave untouched, the output it must not create, and
    what the error line must name (a path, or a path and line)."""

    args: list[str]
    inputs: list[Path]
    where: str
    output: Path | None = None
    extra_outputs: list[Path] = field(default_factory=list)  # e.g. a training run's checkpoint folder


@dataclass(frozen=True)
class Case:
    family: str  # headers, index, adapter-config, recipe, data, model
    name: str
    build: Callable[[Env], Run]

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


# -- writing inputs ---------------------------------------------------------------------------------------------


def safetensors_bytes(header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors file: the 8-byte length (``length``, or the true one), the header (``raw`` bytes, or ``header``
    as compact JSON), then ``data``."""
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def tensor(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def model_folder(folder: Path, env: Env, weights: bytes | None = None, *, name: str = "model.safetensors") -> Path:
    """A model folder with the tiny base's config and tokenizer, and ``weights`` as ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in env.base.iterdir():
        if source.suffix != ".safetensors" and source.is_file():
            shutil.copyfile(source, folder / source.name)
    if weights is not None:
        (folder / name).write_bytes(weights)
    return folder


def copy_adapter(env: Env, folder: Path, **changes: Any) -> Path:
    """A copy of the shared adapter with ``adapter_config.json`` changed (a value of ``...`` removes the key)."""
    shutil.copytree(env.adapter, folder)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
    return folder


def linear_recipe(path: Path, *models: Path) -> Path:
    lines = ["merge_method: linear", "models:"]
    for model in models:
        lines += [f"  - model: {model}", "    parameters: {weight: 0.5}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- checking what happened -------------------------------------------------------------------------------------


def snapshot(paths: list[Path]) -> dict[str, tuple]:
    """Every file and folder under ``paths``: kind, mode, size, modification time and sha256 of the bytes."""
    state: dict[str, tuple] = {}
    for top in paths:
        if top.is_char_device() or not top.exists():
            state[str(top)] = ("other", top.exists())
            continue
        entries = [top] if top.is_file() else [top, *sorted(top.rglob("*"))]
        for entry in entries:
            info = entry.lstat()
            digest = hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else ""
            state[str(entry)] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return state


def leftovers(output: Path) -> list[str]:
    """What a run left where its output would go: the output, or hidden build folders beside it."""
    if not output.parent.is_dir():
        return []
    found = [output.name] if output.exists() else []
    return found + [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))  # an mtime a write would change
    return path
