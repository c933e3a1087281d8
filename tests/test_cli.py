"""The CLI shell: version, fast help, one-line errors with exit codes, tracebacks only with -v."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtool import __version__


def test_version(run_cli) -> None:
    assert __version__ in run_cli("--version").output


def test_help_imports_no_heavy_library() -> None:
    code = ("import sys; from click.testing import CliRunner; from mtool.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors', 'bitsandbytes', 'datasets') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_info_summarizes_without_loading(run_cli, tiny) -> None:
    folder = tiny.model("llama", shards=2)
    summary = json.loads(run_cli("info", folder, "--json").output)
    assert summary["kind"] == "model" and summary["architecture"] == "LlamaForCausalLM"
    assert len(summary["files"]) >= 2 and summary["tensors"] > 10
    text = run_cli("info", folder, "--tensors").output
    assert "model.embed_tokens.weight" in text


def test_errors_are_one_line_without_traceback(run_cli, tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    result = run_cli("info", tmp_path, expect=2)
    assert result.output.startswith("error: refusing to load pickle weights")
    assert "Traceback" not in result.output
    verbose = run_cli("-v", "info", tmp_path, expect=2)
    assert "Traceback" in verbose.output and "error: refusing" in verbose.output


def test_the_executable_keeps_exit_codes_and_output(tmp_path: Path) -> None:
    """``mtool`` (``mtool.cli:run``, also ``python -m mtool.cli``) exits as the command does."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mtool"] == "mtool.cli:run"
    ok = subprocess.run([sys.executable, "-m", "mtool.cli", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and __version__ in ok.stdout
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    refused = subprocess.run([sys.executable, "-m", "mtool.cli", "info", str(tmp_path)], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: refusing to load pickle weights") and "Traceback" not in refused.stderr


def test_the_executable_leaves_without_teardown_noise() -> None:
    """Native extensions that check for leaks at interpreter teardown (nanobind in Triton, which bitsandbytes
    imports when it is installed) print nothing: the executable exits once its output is flushed."""
    pytest.importorskip("triton", reason="Triton (whose nanobind checks for leaks at teardown) is not installed")
    code = ("import sys; import bitsandbytes; from mtool.cli import run; "
            "sys.argv = ['mtool', 'name', 'parse', 'Llama-3.1-8B-Instruct-Medic-SFT-v1.0']; run()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and '"label": "Medic"' in result.stdout  # flushed before leaving
    assert "leaked" not in result.stderr and "nanobind" not in result.stderr


def test_library_notices_about_their_own_extras_are_hidden_unless_verbose(run_cli) -> None:
    """bitsandbytes reports, at import, a kernel package it could not fetch (on CPUs with AVX512-BF16): not the
    user's concern, and it used to print even with -q."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    run_cli("-q", "name", "parse", "Llama-3.1-8B-Instruct-Medic-SFT-v1.0")
    assert not logger.isEnabledFor(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)
    run_cli("-v", "name", "parse", "Llama-3.1-8B-Instruct-Medic-SFT-v1.0")
    assert logger.isEnabledFor(logging.WARNING)
