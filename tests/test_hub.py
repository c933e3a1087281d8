"""Models named by users: what a name that is neither a folder nor a reachable Hub model tells the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtool.errors import InputError
from mtool.hub import is_hub_id, resolve_model


def test_names_that_cannot_be_hub_ids_are_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-models").mkdir()
    assert is_hub_id("someone/symbols")
    for name in ("my-models/symbols", "./symbols", "a/b/c", "~/x", "/abs/x", "org/na me"):
        assert not is_hub_id(name), name
    with pytest.raises(InputError) as error:
        resolve_model("my-models/symbols")
    assert error.value.what == "no such model folder" and str(tmp_path / "my-models" / "symbols") in error.value.where


def test_an_uncached_hub_id_offline_says_where_it_looked_and_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as error:
        resolve_model("someone/not-cached")
    message = error.value.message
    assert "not in the Hugging Face cache" in message and str(tmp_path / "someone" / "not-cached") in message
    assert "hf download someone/not-cached" in message and "HF_HUB_OFFLINE" in message


def test_an_unreachable_hub_is_one_line_without_library_noise(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "mtool.cli", "adapters", "inspect", "someone/symbols"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download the model from the Hugging Face Hub")
    assert "someone/symbols" in lines[0] and "check your network" in lines[0]
