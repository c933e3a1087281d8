"""A name checked on its own, without a folder: the grammar's findings (:func:`mtool.naming.schema.decompose`),
what the known model families say about the Family part (shorthands, spelling, position), and a Label that is only
a base-variant word. ``mtool name lint``, ``mtool name parse`` and every caller that needs a valid name read it
through :func:`check_name`, so they agree on every name.
"""

from __future__ import annotations

from mtool.errors import InputError
from mtool.naming.family import find_family, is_variant_word
from mtool.naming.rules import Finding
from mtool.naming.schema import Decomposition, ModelName, decompose, is_version_like


def family_findings(decomposition: Decomposition) -> list[Finding]:
    """What the known model families say about the Family part (shorthands, spelling, position)."""
    findings: list[Finding] = []
    tokens = decomposition.tokens
    known = find_family(tokens)
    family_tokens = decomposition.family_tokens
    if known is None or not family_tokens:
        return findings
    if known.start > 0:
        moved = [t for t in tokens[:known.start] + family_tokens[known.end:] if not is_version_like(t)]
        findings.append(Finding("family-position", f"the base family {known.family} ({known.spelled(tokens)}) is "
                                "not at the start", f"start the name with {known.family}; move "
                                f"{'-'.join(moved)} into the Label"))
        return findings
    if known.shorthand:
        findings.append(Finding("family-shorthand", f"{known.spelled(tokens)} abbreviates {known.family}",
                                f"write {known.family}"))
    elif known.spelled(tokens) != known.family:
        findings.append(Finding("family-spelling", f"{known.spelled(tokens)!r} is spelled {known.family!r} by its "
                                "publisher", f"write {known.family}"))
    extra = [t for t in family_tokens[known.end:] if not is_version_like(t)]
    if decomposition.parts.size is not None and extra:
        findings.append(Finding("family-spelling", f"the Family {'-'.join(family_tokens)!r} extends {known.family} "
                                f"with {'-'.join(extra)}", f"keep {known.family} and move {'-'.join(extra)} "
                                "into the Label"))
    return findings


def check_name(text: str) -> Decomposition:
    """``text`` split by the grammar, with every finding that needs no folder."""
    decomposition = decompose(text)
    decomposition.findings += family_findings(decomposition)
    label = decomposition.parts.label
    if label and is_variant_word(label):
        decomposition.findings.append(Finding("label-variant", f"the Label {label!r} is a base-variant word",
                                              "add a Label that says what this artifact is"))
    return decomposition


def parse_name(text: str) -> ModelName:
    """The :class:`ModelName` ``text`` spells; :class:`InputError` naming the first grammar error otherwise."""
    decomposition = check_name(text)
    name = decomposition.model_name()
    if name is None:
        first = next(f for f in decomposition.findings if f.severity == "error")
        raise InputError(f"not a valid model name: {first.message}", where=text,
                         fix=f"{first.fix} (run `mtool name lint` for every finding)")
    return name
