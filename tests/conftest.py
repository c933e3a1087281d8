"""Shared fixtures: tiny models built offline, once per test session, with a cache keyed by their recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TinyFactory:
    """Builds tiny model folders on demand and reuses them within the session (treat them as read-only)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple, Path] = {}

    def model(self, architecture: str = "llama", *, tie: bool = False, shards: int = 1, seed: int = 0,
              dtype=None, license: str | None = None, **shape) -> Path:
        from mtool.tinymodels import TinySpec, make_tiny_model

        key = ("model", architecture, tie, shards, seed, str(dtype), license, tuple(sorted(shape.items())))
        if key not in self._made:
            folder = self.root / f"{architecture}-tie{int(tie)}-s{shards}-seed{seed}-{len(self._made)}"
            spec = TinySpec(architecture=architecture, tie_embeddings=tie, **shape)
            self._made[key] = make_tiny_model(folder, spec, seed=seed, shards=shards, dtype=dtype, license=license)
        return self._made[key]

    def finetune(self, base: Path, *, seed: int, scale: float = 0.02, shards: int = 1, dtype=None) -> Path:
        from mtool.tinymodels import make_tiny_finetune

        key = ("finetune", str(base), seed, scale, shards, str(dtype))
        if key not in self._made:
            folder = self.root / f"ft-{len(self._made)}"
            self._made[key] = make_tiny_finetune(base, folder, seed=seed, scale=scale, shards=shards, dtype=dtype)
        return self._made[key]

    def lora(self, base: Path, *, seed: int = 0, **options) -> Path:
        from mtool.tinymodels import make_tiny_lora

        key = ("lora", str(base), seed, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in self._made:
            folder = self.root / f"lora-{len(self._made)}"
            self._made[key] = make_tiny_lora(base, folder, seed=seed, **options)
        return self._made[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """``tiny.model("llama", tie=True, shards=2)``, ``tiny.finetune(base, seed=1)``, ``tiny.lora(base, rank=4)``."""
    return TinyFactory(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_llama(tiny: TinyFactory) -> Path:
    """The default tiny Llama (hidden 64, 2 layers, untied, one file, float32)."""
    return tiny.model("llama")


@pytest.fixture
def run_cli():
    """Invoke the mtool CLI in-process: ``run_cli("merge", recipe, out)`` -> click Result."""
    from click.testing import CliRunner

    from mtool.cli import main

    def invoke(*args: str, expect: int | None = 0):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, f"exit {result.exit_code}, expected {expect}:\n{result.output}"
        return result

    return invoke
