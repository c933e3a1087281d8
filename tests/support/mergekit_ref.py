"""Locating and running mergekit, the merge reference, installed in its own virtual environment."""

from __future__ import annotations

import json
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


def run_mergekit(jobs: list[tuple[Path, Path]] | list[dict], *, work: Path | None = None) -> None:
    """Run each job with mergekit, all in one process. A job is ``(recipe, output folder)`` or a dict for
    ``mergekit_driver.py`` (``recipe``, ``out``, ``seed``, ``kind``, ``options``). A job that fails leaves
    ``<out>.error`` with mergekit's message."""
    python = mergekit_python()
    assert python is not None, SKIP_REASON
    entries = [job if isinstance(job, dict) else {"recipe": str(job[0]), "out": str(job[1])} for job in jobs]
    entries = [{**entry, "recipe": str(entry["recipe"]), "out": str(entry["out"])} for entry in entries]
    listing = (work or Path(entries[0]["out"]).parent) / f"mergekit-jobs-{os.getpid()}-{id(jobs)}.json"
    listing.write_text(json.dumps(entries), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(python), str(Path(__file__).with_name("mergekit_driver.py")), str(listing)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{result.stderr[-4000:]}")


def mergekit_error(out: Path) -> str | None:
    """The error mergekit reported for the job writing ``out``, if it failed."""
    marker = Path(str(out) + ".error")
    return marker.read_text(encoding="utf-8") if marker.is_file() else None
