"""``mtool name lint``: check a name against the schema and, with ``--model``, against the folder it names.

Findings carry a rule id from :data:`mtool.naming.rules.RULES` (severity error / warning / info) and a
one-line fix. Errors make the command exit non-zero. A corrected name is proposed when one can be built:
from the folder's lineage with ``--model``, else from the name's own words (:mod:`mtool.naming.community`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mtool.errors import InputError
from mtool.naming.check import check_name, family_findings
from mtool.naming.community import rewrite
from mtool.naming.facts import FolderFacts, read_facts
from mtool.naming.family import is_variant_word
from mtool.naming.methods import canonical_method
from mtool.naming.rules import Finding, has_errors
from mtool.naming.schema import Decomposition, NameParts
from mtool.naming.size import ParameterCount, parse_size, size_deviation

SIZE_ROUNDING_TOLERANCE = 0.25  # a Size within 25 % of the count is publisher-style rounding (warning), beyond: error


@dataclass
class LintReport:
    name: str
    findings: list[Finding]
    parts: NameParts
    suggestion: str | None = None
    checked_against: str | None = None

    @property
    def ok(self) -> bool:
        return not has_errors(self.findings)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "findings": [f.to_dict() for f in self.findings],
                "parts": asdict(self.parts), "suggestion": self.suggestion, "checked_against": self.checked_against}


def _family_against(parts: NameParts, facts: FolderFacts) -> list[Finding]:
    if facts.base is None or parts.family is None:
        return [Finding("unverified", "the Family could not be checked: the folder's root is unknown",
                        "write the folder with mtool so it carries a lineage record")]
    expected = facts.base.family
    if parts.family == expected:
        return []
    if not facts.base.release_known and parts.family.lower().startswith(expected.lower()):
        return [Finding("unverified", f"the release in {parts.family} could not be checked ({facts.family_source})",
                        "nothing to fix if the release is right")]
    return [Finding("family-mismatch", f"Family {parts.family} but the lineage root is {expected} "
                    f"(from {facts.family_source})", f"write {expected}")]


def _size_against(parts: NameParts, facts: FolderFacts) -> list[Finding]:
    if parts.size is None:
        return []
    if facts.parameters is None:
        if facts.size is None:
            return [Finding("unverified", "the Size could not be checked: no weights to count",
                            "keep the weights (or the adapter's base) where the lineage says")]
        if (parse_size(facts.size) and parse_size(parts.size)
                and parse_size(facts.size).count == parse_size(parts.size).count):
            return []
        return [Finding("unverified", f"Size {parts.size}; the base's id says {facts.size} ({facts.size_source})",
                        "check the base's parameter count")]
    count: ParameterCount = facts.parameters
    computed = facts.size
    deviation = size_deviation(parts.size, count)
    if deviation is None:
        return [Finding("size-mismatch", f"Size {parts.size} but the weights hold {computed} ({count.total:,} "
                        f"parameters{', %d experts' % count.experts if count.experts else ''})", f"write {computed}")]
    if deviation == 0.0:
        return []
    if deviation <= SIZE_ROUNDING_TOLERANCE:
        return [Finding("size-rounding", f"Size {parts.size} is {deviation:.0%} off the computed {computed}",
                        f"write {computed}")]
    return [Finding("size-mismatch", f"Size {parts.size} but the weights hold {computed} ({count.total:,} parameters)",
                    f"write {computed}")]


def _method_against(parts: NameParts, facts: FolderFacts) -> list[Finding]:
    findings = []
    if parts.lora != facts.is_adapter:
        kind = "a PEFT adapter" if facts.is_adapter else "a full model"
        findings.append(Finding("lora-mismatch", f"the folder is {kind}",
                                "append -LoRA after the version" if facts.is_adapter else "remove -LoRA"))
    if parts.method is None:
        return findings
    if facts.method is None:
        findings.append(Finding("unverified", "the Method could not be checked: the folder has no lineage record",
                                "write the folder with mtool so it carries a lineage record"))
        return findings
    named = canonical_method(parts.method)
    assert named is not None
    if named.relation != facts.method.relation:
        findings.append(Finding("relation-mismatch", f"{named.name} implies {named.relation} but the folder is a "
                                f"{facts.method.relation} ({facts.method_source})", f"write {facts.method.name}"))
    elif named.name != facts.method.name:
        findings.append(Finding("method-mismatch", f"Method {named.name} but the lineage says {facts.method.name} "
                                f"({facts.method_source})", f"write {facts.method.name}"))
    return findings


def lint_name(text: str, model: str | Path | FolderFacts | None = None) -> LintReport:
    """Every finding for ``text`` (and against ``model``, a folder or its facts), with a corrected name."""
    if not text or not text.strip():
        raise InputError("empty name", where="the NAME argument", fix="give the name to check")
    decomposition = check_name(text)
    findings = list(decomposition.findings)
    parts = decomposition.parts
    report = LintReport(name=text, findings=findings, parts=parts)
    facts = read_facts(model) if isinstance(model, (str, Path)) else model
    if facts is not None:
        report.checked_against = str(facts.folder)
        findings += _family_against(parts, facts)
        findings += _size_against(parts, facts)
        findings += _method_against(parts, facts)
    report.suggestion = _correction(decomposition, report, facts)
    return report


def _correction(decomposition: Decomposition, report: LintReport, facts: FolderFacts | None) -> str | None:
    """A name without the findings: from the folder when given, else the canonical spelling of the parts or a
    rewrite of the words; None when the name needs no change or none can be built."""
    if not any(f.severity in ("error", "warning") for f in report.findings):
        return None
    if facts is not None:
        from mtool.naming.suggest import suggest_from_facts

        label = decomposition.parts.label
        try:
            suggestion = suggest_from_facts(facts, label=label if label and not is_variant_word(label) else None,
                                            version=decomposition.parts.version or "v1.0")
        except InputError:
            return None
        return suggestion.name.format()
    name = decomposition.model_name()
    if name is not None and not any(f.severity == "error" for f in family_findings(decomposition)):
        fixed = rewrite(name.format()) if family_findings(decomposition) else name
        return fixed.format() if fixed is not None and fixed.format() != report.name else None
    fixed = rewrite(report.name)
    return fixed.format() if fixed is not None else None
