"""The README walked as a new user walks it: the quick start, then every command of the tour, in order, as written.

The walk runs in a scratch folder that holds the repository's files by link (the demo and the tour's outputs land
there, not in the checkout), with the checkout's ``.venv``. ``bash scripts/test.sh`` is the one quick-start line
left out: it is what runs this test. The walk needs ``.venv`` installed from this checkout (what ``scripts/test.sh``
and ``.ci/run`` make); elsewhere ``scripts/setup.sh`` would install the scratch folder instead, so it is skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINKED = ("scripts", "mtool", "recipes", "pyproject.toml", "README.md", ".venv")
RUNS_THIS_TEST = "bash scripts/test.sh"


def bash_block(text: str, heading: str) -> str:
    """The first ```bash block under ``heading`` (a whole heading line, e.g. ``## A tour``)."""
    section = text.split(f"\n{heading}\n", 1)[1]
    match = re.search(r"^```bash\n(.*?)^```$", section, flags=re.S | re.M)
    assert match is not None, f"no bash block under {heading}"
    return match.group(1)


def quick_start_commands(text: str) -> list[str]:
    """The quick start's lines but the one that runs the test suite (and the comment lines that continue it)."""
    lines = bash_block(text, "## Quick start").splitlines()
    kept = [line for line in lines if not line.startswith(RUNS_THIS_TEST) and not line.lstrip().startswith("#")]
    assert any(line.startswith("bash scripts/demo.sh") for line in kept)
    return kept


def _installed_from_this_checkout() -> bool:
    """``.venv`` was set up by ``scripts/setup.sh`` from this pyproject (its stamp; see setup.sh)."""
    stamp = REPO / ".venv" / ".mtool-installed"
    if not (REPO / ".venv" / "bin" / "mtool").exists() or not stamp.exists():
        return False
    sources = ("pyproject.toml", "mtool/merger/methods/_sortpath.c", "mtool/merger/methods/_sortpath_body.h")
    digest = hashlib.sha256(b"".join((REPO / name).read_bytes() for name in sources)).hexdigest()
    extras = os.environ.get("MTOOL_EXTRAS", "test")
    return stamp.read_text().strip() == f"{digest} {extras}"


def test_the_quick_start_names_the_line_that_puts_mtool_on_path() -> None:
    text = README.read_text(encoding="utf-8")
    assert "source .venv/bin/activate" in quick_start_commands(text)
    assert bash_block(text, "## A tour").startswith("source .venv/bin/activate")


def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    if not _installed_from_this_checkout():
        pytest.skip(".venv is not installed from this checkout (run bash scripts/test.sh)")
    text = README.read_text(encoding="utf-8")
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name)
    script = "\n".join(["set -euo pipefail", *quick_start_commands(text), bash_block(text, "## A tour")])
    (tmp_path / "walk.sh").write_text(script, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep)
                                  if not part.startswith(str(REPO / ".venv")))  # mtool on PATH only once activated
    result = subprocess.run(["bash", "walk.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output
    # what the walk made: the demo's table, then the tour's outputs, each a complete folder with its record
    assert "names: 10 of 10 lint clean" in output
    for folder in ("merged", "staged", "experts", "capitals-merged", "combined", "extracted", "smaller",
                   "capitals-adapter", "best"):
        assert (tmp_path / folder / "mtool-lineage.json").is_file(), folder
    assert sorted(path.name for path in (tmp_path / "merged-GGUF").glob("*.gguf")) == [
        "Llama-558K-CapitalsSymbols-TIES-v1.0-F16.gguf", "Llama-558K-CapitalsSymbols-TIES-v1.0-Q8_0.gguf"]
    assert (tmp_path / "results.png").is_file()
