"""``mtool name suggest|lint|parse`` and ``mtool card``: thin Click wrappers over mtool.naming.

Only click and the standard library are imported here; the work is imported inside each command.
"""

from __future__ import annotations

import json
import sys

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
    from mtool.naming.lint import lint_name
    from mtool.naming.schema import decompose

    decomposition = decompose(text)
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
              help="Publish under this license instead of the one resolved from the parents.")
@click.option("--repo-id", help="The Hub id the folder will be uploaded as, for the usage snippet (default: the name).")
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the card (default: MODEL_DIR/README.md).")
@click.option("--force", is_flag=True, help="Replace an existing card.")
def card(model_dir: str, model_name: str | None, license_id: str | None, repo_id: str | None, out: str | None,
         force: bool) -> None:
    """Write the model card (README.md with Hub metadata) of MODEL_DIR from its lineage record."""
    from mtool import ui
    from mtool.naming.card import write_card

    path = write_card(model_dir, name=model_name, license=license_id, repo_id=repo_id, out=out, force=force)
    ui.info(f"wrote {path}")
