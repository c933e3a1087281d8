"""Locating and running mergekit, the merge reference, installed in its own virtual environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def mergekit_python() -> Path | None:
    """``$MTOOL_MERGEKIT_PYTHON`` or ``.mkvenv/bin/python`` when it has mergekit, else None."""
    candidates = [os.environ.get("MTOOL_MERGEKIT_PYTHON"), str(REPO / ".mkvenv" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([candidate, "-c", "import mergekit"], capture_output=True)
            if probe.returncode == 0:
                return Path(candidate)
    return None


SKIP_REASON = ("mergekit reference not installed: run `MTOOL_MERGEKIT=1 bash scripts/setup.sh` "
               "(or set MTOOL_MERGEKIT_PYTHON to a python that has mergekit 0.1.5)")


def run_mergekit(jobs: list[tuple[Path, Path]]) -> None:
    """Run each (recipe, output folder) with mergekit, all in one process."""
    python = mergekit_python()
    assert python is not None, SKIP_REASON
    arguments = [str(p) for job in jobs for p in job]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([str(python), str(Path(__file__).with_name("mergekit_driver.py")), *arguments],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{result.stderr[-4000:]}")
