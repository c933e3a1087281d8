"""The hostile-input corpus (tests/hostile/): every case ends in one clean line and changes nothing.

For each case: a non-zero exit; exactly one line on stderr, ``error: what (where). fix``, printable, naming the
file (and line) at fault, never "unexpected" (the CLI's catch-all for bugs) nor a traceback; no output folder and
no hidden build folder; the inputs byte for byte, mode and modification time as they were.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtool.cli import main
from tests.hostile import configs, records, weights
from tests.hostile.cases import Case, Env, leftovers, snapshot

CASES: list[Case] = weights.CASES + configs.CASES + records.CASES
MAX_LINE = 1200  # characters: a message never formats an unbounded value


@pytest.fixture(scope="module")
def shared(tiny, tmp_path_factory):
    base = tiny.model("llama")
    adapter = tiny.lora(base, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    return base, adapter


def test_the_corpus_is_large_and_covers_every_family() -> None:
    families = {case.family for case in CASES}
    assert families == {"headers", "index", "model", "adapter-config", "recipe", "data"}
    assert len(CASES) + len(records.NAMES) >= 200
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input_ends_in_one_clean_line(case: Case, shared, tmp_path: Path) -> None:
    base, adapter = shared
    env = Env(root=tmp_path, base=base, adapter=adapter)
    run = case.build(env)
    before = snapshot(run.inputs)
    result = CliRunner().invoke(main, ["-q", *run.args], catch_exceptions=False)
    lines = result.stderr.splitlines()
    assert result.exit_code != 0, result.output
    assert len(lines) == 1, result.stderr[:3000]
    line = lines[0]
    assert line.startswith("error: ") and line.isprintable(), line[:500]
    assert "unexpected" not in line.lower() and "Traceback" not in result.output
    assert len(line) <= MAX_LINE, f"{len(line)} characters: {line[:300]}..."
    assert run.where in line, f"expected {run.where!r} in: {line[:500]}"
    assert re.search(r"\)\. \S", line), f"no fix after the where part: {line[:500]}"
    assert snapshot(run.inputs) == before, "an input was changed"
    for output in filter(None, [run.output, *run.extra_outputs]):
        assert leftovers(output) == [], f"left behind: {leftovers(output)}"


@pytest.mark.parametrize("name", list(records.NAMES), ids=list(records.NAMES))
def test_name_lint_and_parse_escape_what_they_echo(name: str) -> None:
    text = records.NAMES[name]
    for command in (["name", "lint", "--", text], ["name", "lint", "--json", "--", text],
                    ["name", "parse", "--", text]):
        result = CliRunner().invoke(main, command, catch_exceptions=False)
        assert result.exit_code in ((2,) if not text.strip() else (0, 1)), result.output
        assert "unexpected" not in result.output.lower() and "Traceback" not in result.output
        for line in result.output.splitlines():  # no control character, no byte that was not UTF-8
            assert line.isprintable() and not any(0xDC80 <= ord(c) <= 0xDCFF for c in line), repr(line[:200])


def test_name_lint_with_invalid_utf8_on_a_strictly_utf8_stdout(tmp_path: Path) -> None:
    """The real process: argv bytes that are not UTF-8, stdout that refuses anything but UTF-8."""
    name = b"Llama-3-8B-\xff\xfe\x1b[31m-SFT-v1.0"
    result = subprocess.run([sys.executable, "-m", "mtool.cli", "name", "lint", name], capture_output=True,
                            env={"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin",
                                 "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 1, result.stderr.decode(errors="replace")
    out = result.stdout.decode("utf-8")  # strict: the output is valid UTF-8
    assert "error   ascii" in out and "\x1b" not in out
    assert all(line.isprintable() for line in out.splitlines())
