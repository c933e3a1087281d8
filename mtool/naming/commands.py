"""``mtool name suggest|lint|parse`` and ``mtool card``: thin Click wrappers over mtool.naming.

Only click and the standard library are imported here; the work is imported inside each command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mtool.errors import printable

MODEL_DIR = click.Path(exists=True, file_okay=False)


@click.group()
def name() -> None:
    """Standardized model names: suggest one from a folder's lineage, lint or parse one.

    \b
    NAME = <Family>-<Size>[-<BaseVariant>]-<Label>-<Method>-v<Major>.<Minor>[-LoRA][-<Encoding>]
    e.g.   Llama-3.1-8B-Instruct-Medic-SFT-v1.0-LoRA (see docs/naming.md)
    """


@name.command()
@click.argument("model_dir", type=MODEL_DIR)
@click.option("--label", help="The Label part (default: from the data set, the merged models or the folder name).")
@click.option("--version", "version", default="v1.0", show_default=True,
              help="This artifact's version, v<Major>.<Minor>.")
@click.option("--method", help="The Method, for a folder whose lineage record does not name it (SFT, SLERP, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the name, its parts and where each came from as JSON.")
def suggest(model_dir: str, label: str | None, version: str, method: str | None, as_json: bool) -> None:
    """Print the standardized name of the model in MODEL_DIR, derived from its lineage record and weights."""
    from mtool.naming.facts import read_facts
    from mtool.naming.suggest import suggest_from_facts

    suggestion = suggest_from_facts(read_facts(model_dir), label=label, version=version, method=method)
    if as_json:
        click.echo(json.dumps({"name": suggestion.name.format(), "parts": suggestion.name.to_dict(),
                               "sources": suggestion.sources}, indent=2))
    else:
        click.echo(printable(suggestion.name.format()))


@name.command()
@click.argument("text", metavar="NAME")
@click.option("--model", "model_dir", type=MODEL_DIR, help="Also check the name against this model folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def lint(text: str, model_dir: str | None, as_json: bool) -> None:
    """Check NAME against the naming schema (and MODEL_DIR); exit 1 when there are errors."""
    from mtool.naming.lint import lint_name

    report = lint_name(text, model_dir)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))  # ASCII: JSON escapes what it cannot print
    else:  # the findings quote the name: every line is escaped (control characters, bytes that are not UTF-8)
        for finding in report.findings:
            click.echo(printable(f"{finding.severity:7} {finding.rule:20} {finding.message}; fix: {finding.fix}"))
        if report.suggestion:
            click.echo(printable(f"suggested name: {report.suggestion}"))
        if not report.findings:
            click.echo(printable(f"{text}: ok"))
    if not report.ok:
        sys.exit(1)


@name.command()
@click.argument("text", metavar="NAME")
def parse(text: str) -> None:
    """Print the parts of NAME as JSON; exit 1 when NAME does not follow the schema (the parts are then the
    grammar's best reading, and `suggestion` a conforming rewrite when one can be made)."""
    from mtool.naming.check import check_name
    from mtool.naming.lint import lint_name

    decomposition = check_name(text)
    conforming = decomposition.model_name()
    if conforming is not None:
        output = {"name": decomposition.name, "conforms": True, **conforming.to_dict(),
                  "gguf": conforming.gguf_fields()}
    else:
        parts = decomposition.parts
        output = {"name": decomposition.name, "conforms": False, "family": parts.family, "size": parts.size,
                  "base_variant": parts.base_variant, "label": parts.label, "method": parts.method,
                  "version": parts.version, "lora": parts.lora, "encoding": parts.encoding,
                  "errors": [f.to_dict() for f in decomposition.findings if f.severity == "error"],
                  "suggestion": lint_name(text).suggestion}
    if decomposition.owner:
        output["owner"] = decomposition.owner
    click.echo(json.dumps(output, indent=2))
    if conforming is None:
        sys.exit(1)


@click.command()
@click.argument("model_dir", type=MODEL_DIR)
@click.option("--name", "model_name",
              help="The model's name (default: `mtool name suggest`'s); must follow the schema.")
@click.option("--license", "license_id",
              help="Publish under this license instead of the one resolved from the parents (kept in the lineage "
                   "record, so later cards and models made from this one keep it).")
@click.option("--repo-id", help="The Hub id the folder will be uploaded as, for the usage snippet (default: the name).")
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the card (default: MODEL_DIR/README.md).")
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the card instead of writing it.")
@click.option("--check", is_flag=True,
              help="Check the existing card (MODEL_DIR/README.md, or --out) is publishable as written: it parses, "
                   "names no local path, has no empty section and shows numbers rounded. Exit 1 if not.")
@click.option("--force", is_flag=True, help="Replace a card that was not written by mtool.")
def card(model_dir: str, model_name: str | None, license_id: str | None, repo_id: str | None, out: str | None,
         to_stdout: bool, check: bool, force: bool) -> None:
    """Write the model card (README.md with Hub metadata) of MODEL_DIR from its lineage record.

    A card mtool wrote earlier is regenerated (cards are derived from the lineage record); a card written by hand
    is kept unless --force.
    """
    from mtool import ui
    from mtool.naming.card import CARD_FILENAME, build_card, write_card

    target = Path(out) if out else Path(model_dir) / CARD_FILENAME
    if check:
        _check_card(target)
        return
    if to_stdout:
        click.echo(build_card(model_dir, name=model_name, license=license_id, repo_id=repo_id)[1], nl=False)
        return
    existed = target.exists()
    path = write_card(model_dir, name=model_name, license=license_id, repo_id=repo_id, out=out, force=force)
    ui.info(f"{'regenerated' if existed else 'wrote'} {path} from the lineage record")


def _check_card(path: Path) -> None:
    from mtool.errors import InputError
    from mtool.naming.publishable import card_problems

    if not path.is_file():
        raise InputError("no model card to check", where=str(path), fix="write it first with `mtool card`")
    problems = card_problems(path.read_text(encoding="utf-8", errors="replace"))
    for problem in problems:
        click.echo(f"{path}: {problem}")
    if problems:
        sys.exit(1)
    click.echo(f"{path}: publishable")
