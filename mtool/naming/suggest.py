"""``mtool name suggest``: the name of a model folder, derived from its lineage record and its weights.

Family and BaseVariant come from the lineage root, Size from the parameter count, Method from the
operation, ``-LoRA`` from the folder being an adapter; the Label is given (``--label``) or taken from the
training data set, the merged models' names or the folder name; the version is given (default v1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtool.errors import InputError
from mtool.naming.check import check_name
from mtool.naming.facts import Derived, FolderFacts, read_facts
from mtool.naming.label import derive_label
from mtool.naming.methods import find_method, method_names
from mtool.naming.schema import ModelName, canonical_version, is_word

EXPORT_ENCODINGS = {"gguf": "GGUF"}  # an exported folder's Encoding part, by the format it holds


@dataclass(frozen=True)
class Suggestion:
    name: ModelName
    sources: dict[str, str]  # part -> where it came from


def normalize_version(version: str) -> str:
    """``1`` / ``v1`` / ``1.0`` / ``v1.0`` -> ``v1.0``; InputError for anything else."""
    text = version.strip()
    canonical = canonical_version(text if text.lower().startswith("v") else f"v{text}")
    if canonical is None:
        raise InputError(f"not a version: {version!r}", where="--version", fix="give v<Major>.<Minor>, e.g. v1.0")
    return canonical


def _check_label(label: str) -> str:
    if not is_word(label) or not any(c.isalpha() for c in label):
        raise InputError(f"not a valid Label: {label!r}", where="--label",
                         fix="one part of ASCII letters and digits (CamelCase), '.' only between digits")
    return label


def suggest_from_facts(facts: FolderFacts, *, label: str | None = None, version: str = "v1.0",
                       method: str | None = None) -> Suggestion:
    """The name for the folder ``facts`` describe; InputError naming what is missing and the option to give."""
    if facts.base is None:
        raise InputError("cannot tell the Family of this model", where=str(facts.folder),
                         fix="write it with mtool (lineage record) or keep its config.json / adapter_config.json")
    if facts.size is None:
        raise InputError("cannot compute the Size: no weights to count", where=str(facts.folder),
                         fix="keep the weights (or, for an adapter, its base folder) where the lineage says")
    if method is not None:
        chosen = find_method(method)
        if chosen is None:
            raise InputError(f"unknown method {method!r}", where="--method",
                             fix=f"use one of {', '.join(method_names())}")
        found = Derived(chosen, "--method")
    elif facts.method is not None:
        found = Derived(facts.method, facts.method_source)
    else:
        raise InputError("cannot tell the Method: the folder has no lineage record naming its operation",
                         where=str(facts.folder), fix=f"pass --method (one of {', '.join(method_names())})")
    if label is not None:
        chosen_label = Derived(_check_label(label), "--label")
    else:
        chosen_label = derive_label(facts.folder, facts.lineage)
        if chosen_label is None:
            raise InputError("cannot derive a Label", where=str(facts.folder), fix="pass --label")
    exported = facts.lineage is not None and facts.lineage.operation == "export"
    name = ModelName(family=facts.base.family, size=facts.size, base_variant=facts.base.variant,
                     label=str(chosen_label.value), method=found.value.name, version=normalize_version(version),
                     lora=facts.is_adapter, encoding=EXPORT_ENCODINGS.get(str(facts.lineage.method)) if exported
                     else None)
    checked = check_name(name.format())
    if checked.model_name() is None:
        problems = "; ".join(str(f) for f in checked.findings if f.severity == "error")
        raise InputError(f"the derived name {name} does not follow the schema: {problems}", where=str(facts.folder),
                         fix="pass --label (and check the lineage record)")
    sources = {"family": facts.family_source, "size": facts.size_source, "method": found.source,
               "label": chosen_label.source, "version": "--version" if version != "v1.0" else "default"}
    return Suggestion(name, sources)


def suggest_name(folder: str | Path, *, label: str | None = None, version: str = "v1.0",
                 method: str | None = None) -> ModelName:
    """The standardized name of the model in ``folder`` (see the module docstring)."""
    return suggest_from_facts(read_facts(folder), label=label, version=version, method=method).name
