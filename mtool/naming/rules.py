"""The lint rules of the naming schema: one id, one severity and one summary each, and a Finding type.

The table is the reference for ``mtool name lint`` and for docs/naming.md; every finding a check
produces names one of these ids and carries a one-line fix specific to the name at hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: Severity
    summary: str


RULES: dict[str, Rule] = {rule.id: rule for rule in (
    # Hub repository-id validity
    Rule("ascii", "error", "only ASCII characters"),
    Rule("chars", "error", "only letters, digits, '-' and '.' ('_' inside an encoding token)"),
    Rule("length", "error", "at most 96 characters (the Hub's limit for a repository name)"),
    Rule("double-separator", "error", "no '--' and no '..' (the Hub refuses them)"),
    Rule("edge-separator", "error", "no '-' or '.' at the start or the end"),
    Rule("owner-prefix", "info", "the owner ('owner/') is not part of the name; only the name is checked"),
    # grammar
    Rule("underscore", "error", "'-' separates parts; '_' only inside an encoding token such as Q4_K_M"),
    Rule("dot-outside-number", "error", "'.' only between two digits (3.1, v0.2, 7.2B)"),
    Rule("no-family", "error", "the name starts with the Family (the lineage root's name)"),
    Rule("no-size", "error", "a Size part (8.0B, 494M, 8x7.2B) follows the Family"),
    Rule("multiple-sizes", "error", "one Size part only"),
    Rule("size-format", "warning", "the Size is digits and an upper-case unit, M below one billion"),
    Rule("no-label", "error", "a Label part between the Size (or BaseVariant) and the Method"),
    Rule("too-many-parts", "error", "at most two parts between Size and Method: [BaseVariant-]Label"),
    Rule("label-variant", "warning", "the Label is a base-variant word; name what this artifact is"),
    Rule("no-method", "error", "a Method from the closed list precedes the version"),
    Rule("multiple-methods", "error", "one Method only: the last operation (the card records the rest)"),
    Rule("method-position", "error", "the Method comes right before the version"),
    Rule("method-spelling", "warning", "the Method is spelled as in the closed list"),
    Rule("no-version", "error", "the name ends with the version v<Major>.<Minor> (before -LoRA/encoding)"),
    Rule("version-format", "error", "the version is v<Major>.<Minor>"),
    Rule("version-position", "error", "a version-like part between Size and Method makes the Label ambiguous"),
    Rule("lora-position", "error", "LoRA comes right after the version"),
    Rule("lora-spelling", "warning", "the adapter marker is spelled LoRA"),
    Rule("quant-position", "error", "quantization/encoding tokens only in the final encoding part"),
    Rule("encoding-spelling", "warning", "encoding tokens are spelled as llama.cpp and the Hub spell them"),
    # what is known about model families
    Rule("family-shorthand", "warning", "the Family is spelled out, not abbreviated (L2 -> Llama-2)"),
    Rule("family-spelling", "warning", "the Family is spelled as its publisher spells it"),
    Rule("family-position", "error", "the base family comes first (licenses such as Llama's require it)"),
    # against a model folder (--model)
    Rule("family-mismatch", "error", "the Family is the lineage root's"),
    Rule("size-mismatch", "error", "the Size matches the parameter count computed from the weights"),
    Rule("size-rounding", "warning", "the Size is the computed count rounded to two significant digits"),
    Rule("relation-mismatch", "error", "the Method's relation is the folder's (finetune / merge / adapter)"),
    Rule("method-mismatch", "error", "the Method is the one the lineage record names"),
    Rule("lora-mismatch", "error", "-LoRA if and only if the folder is an adapter"),
    Rule("unverified", "info", "a part could not be checked against the folder"),
)}


@dataclass(frozen=True)
class Finding:
    """One problem found in a name: a rule id, a message about this name, and a one-line fix."""

    rule: str
    message: str
    fix: str

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise KeyError(f"unknown naming rule {self.rule!r}")

    @property
    def severity(self) -> Severity:
        return RULES[self.rule].severity

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "severity": self.severity, **{k: v for k, v in asdict(self).items() if k != "rule"}}

    def __str__(self) -> str:
        return f"{self.severity}[{self.rule}] {self.message}; fix: {self.fix}"


def has_errors(findings: list[Finding]) -> bool:
    return any(finding.severity == "error" for finding in findings)
