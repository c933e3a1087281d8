"""``mtool name lint`` and ``mtool name parse`` agree on every name of a corpus of real Hub model names
(tests/data/hub_model_names.tsv: each name with the public page or repository file it was copied from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtool.naming.check import check_name
from mtool.naming.lint import lint_name

CORPUS = Path(__file__).parent / "data" / "hub_model_names.tsv"


def _corpus() -> list[tuple[str, str]]:
    header, *lines = CORPUS.read_text(encoding="utf-8").splitlines()
    assert header == "model_id\tsource"
    return [tuple(line.split("\t", 1)) for line in lines]


def test_the_corpus_is_real_names_with_their_sources() -> None:
    rows = _corpus()
    assert len(rows) >= 200
    ids = [model_id for model_id, _ in rows]
    assert len({i.lower() for i in ids}) == len(ids)
    assert all(model_id.count("/") == 1 and source.strip() for model_id, source in rows)


def test_lint_and_parse_agree_on_every_name() -> None:
    disagreements = []
    for model_id, _ in _corpus():
        report, parsed = lint_name(model_id), check_name(model_id)
        lint_errors = sorted(f.rule for f in report.findings if f.severity == "error")
        parse_errors = sorted(f.rule for f in parsed.findings if f.severity == "error")
        if report.ok != (parsed.model_name() is not None) or lint_errors != parse_errors \
                or report.parts != parsed.parts:
            disagreements.append((model_id, lint_errors, parse_errors))
    assert disagreements == []


def test_every_suggested_rewrite_lints_clean() -> None:
    for model_id, _ in _corpus():
        suggestion = lint_name(model_id).suggestion
        if suggestion is not None:
            assert lint_name(suggestion).ok, (model_id, suggestion)


@pytest.mark.parametrize("name", ["MythoMax-L2-Kimiko-v2-13B-slerp-DARE-v0.3-GGUF",
                                  "Llama-3.1-8B-Instruct-Medic-SFT-v1.0", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"])
def test_the_two_commands_give_one_verdict(run_cli, name: str) -> None:
    lint = run_cli("name", "lint", name, "--json", expect=None)
    parse = run_cli("name", "parse", name, expect=None)
    assert lint.exit_code == parse.exit_code
    linted, parsed = json.loads(lint.output), json.loads(parse.output)
    assert linted["ok"] == parsed["conforms"]
    if not parsed["conforms"]:
        assert sorted(e["rule"] for e in parsed["errors"]) == \
            sorted(f["rule"] for f in linted["findings"] if f["severity"] == "error")
    for part in ("family", "size", "label", "method", "version"):
        assert linted["parts"][part] == parsed[part]
