"""What a model folder says about itself, for its name and its card: lineage record, configs, adapter or not,
the lineage root's family, the parameter count, the Method, and the gaps where something is unknown.

Everything is read from files (the lineage record, config.json / adapter_config.json, safetensors headers);
no weights are loaded and nothing is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mtool.errors import CheckpointError, InputError
from mtool.io.folders import card_metadata
from mtool.io.jsonfiles import read_json_object
from mtool.lineage import Lineage, Parent, read_lineage
from mtool.naming.family import BaseModelName, family_from_config, family_from_model_id, find_family, split_model_id
from mtool.naming.methods import Method, canonical_method, method_of_record
from mtool.naming.size import ParameterCount, count_parameters, size_label

_STAGING = re.compile(r"\.(?P<name>.+)\.partial-[^.]+")  # the staging folder of mtool.checkpoint.atomic_output_dir
_HUB_CACHE = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+")


def output_name(folder: Path) -> str:
    """The name a folder will have: a staging folder ``.NAME.partial-xyz`` becomes ``NAME``."""
    match = _STAGING.fullmatch(folder.name)
    return match["name"] if match else folder.resolve().name


def looks_like_hub_id(reference: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(reference)) and not Path(reference).expanduser().exists()


def hub_id_of_path(path: str | None) -> str | None:
    """The Hub id of a folder inside the Hugging Face cache (``.../models--org--name/snapshots/<rev>``)."""
    if not path:
        return None
    match = _HUB_CACHE.search(str(path).replace("\\", "/") + "/")
    return f"{match['owner']}/{match['name']}" if match else None


def read_json(path: Path) -> dict | None:
    """A JSON object file (read with bounds: :mod:`mtool.io.jsonfiles`), None when absent; an InputError when it
    is malformed or not an object."""
    if not path.is_file():
        return None
    return read_json_object(path, what=path.name)


@dataclass(frozen=True)
class Derived:
    """A value and where it came from (shown in the card and by lint)."""

    value: object
    source: str


@dataclass
class FolderFacts:
    folder: Path
    lineage: Lineage | None
    config: dict | None
    adapter_config: dict | None
    is_adapter: bool
    base: BaseModelName | None = None  # Family / BaseVariant of the lineage root
    family_source: str = ""
    parameters: ParameterCount | None = None  # of the model, or of an adapter's base
    size: str | None = None
    size_source: str = ""
    method: Method | None = None
    method_source: str = ""
    gaps: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The lineage root and its family

_ROLE_ORDER = {"base": 0, "model": 1, "adapter": 2}


def primary_parent(parents: list[Parent]) -> Parent | None:
    """The parent a name descends from: the base, else the first model, else the first adapter."""
    candidates = [p for p in parents if p.role in _ROLE_ORDER]
    return min(candidates, key=lambda p: _ROLE_ORDER[p.role]) if candidates else None


def lineage_root(lineage: Lineage) -> Parent | None:
    """Follow the primary parent down the embedded records to the root (the parent without a record)."""
    parent = primary_parent(lineage.parents)
    while parent is not None and parent.lineage is not None and parent.lineage.parents:
        deeper = primary_parent(parent.lineage.parents)
        if deeper is None:
            break
        parent = deeper
    return parent


def _adapter_base_reference(folder: Path) -> str | None:
    config = read_json(folder / "adapter_config.json") if folder.is_dir() else None
    value = (config or {}).get("base_model_name_or_path")
    return str(value) if value else None


def family_of_reference(reference: str, path: str | None = None) -> Derived | None:
    """The Family (a :class:`BaseModelName`) of a model named by a Hub id or a local folder."""
    hub_id = reference if looks_like_hub_id(reference) else hub_id_of_path(path or reference)
    if hub_id:
        return Derived(family_from_model_id(hub_id), f"the Hub id {hub_id}")
    folder = Path(path or reference)
    if folder.is_dir():
        base_reference = _adapter_base_reference(folder)
        if base_reference and base_reference != str(folder):
            found = family_of_reference(base_reference)
            if found is not None:
                return Derived(found.value, f"the adapter's base ({found.source})")
        if find_family(split_model_id(folder.name)) is not None:
            return Derived(family_from_model_id(folder.name), f"the folder name {folder.name}")
        config = read_json(folder / "config.json")
        named = _family_of_names(folder, config)
        if named is not None:
            return named
        configured = family_from_config(config) if config else None
        if configured is not None:
            return Derived(configured.as_base(), configured.note)
    if find_family(split_model_id(reference)) is not None:
        return Derived(family_from_model_id(reference), f"the name {reference}")
    return None


def _family_of_names(folder: Path, config: dict | None) -> Derived | None:
    """The Family a folder's files name, when its own name does not: the model id it was saved from
    (``_name_or_path`` in config.json), or its card's ``base_model`` / GGUF-style ``model_basename``."""
    candidates = []
    if config and isinstance(config.get("_name_or_path"), str):
        candidates.append((config["_name_or_path"], "_name_or_path in config.json"))
    front = card_metadata(folder / "README.md")
    for key in ("base_model", "model_basename", "model_name"):
        value = front.get(key)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, str):
            candidates.append((value, f"{key} in its card"))
    for value, source in candidates:
        name = value.rstrip("/").rsplit("/", 1)[-1] if not looks_like_hub_id(value) else value
        if find_family(split_model_id(name.rsplit("/", 1)[-1])) is not None:
            return Derived(family_from_model_id(name), f"{source} ({value})")
    return None


# --------------------------------------------------------------------------------------------------
# Parameter count


def _count(folder: Path) -> ParameterCount | None:
    try:
        return count_parameters(folder)
    except (CheckpointError, InputError):
        return None


def base_parent(lineage: Lineage) -> Parent | None:
    """The base of an adapter's record: a direct ``base`` parent, else the base of an adapter parent's record."""
    for parent in lineage.parents:
        if parent.role == "base":
            return parent
    for parent in lineage.parents:
        if parent.role == "adapter" and parent.lineage is not None:
            found = base_parent(parent.lineage)
            if found is not None:
                return found
    return None


def base_parameters(lineage: Lineage | None, adapter_config: dict | None) -> Derived | None:
    """An adapter's base size: counted from its weights when the folder is at hand, else from its record,
    else as its Hub id spells it (a size label string)."""
    candidates: list[tuple[str, str | None, Lineage | None]] = []
    if lineage is not None:
        base = base_parent(lineage)
        if base is not None:
            candidates.append((base.id, base.path, base.lineage))
    reference = (adapter_config or {}).get("base_model_name_or_path")
    if reference:
        candidates.append((str(reference), str(reference), None))
    for reference, path, record in candidates:
        if path and Path(path).is_dir():
            counted = _count(Path(path))
            if counted is not None:
                return Derived(counted, f"the base's weights ({path})")
        if record is not None and record.parameter_count:
            return Derived(ParameterCount(record.parameter_count), f"the base's lineage record ({reference})")
    for reference, path, _ in candidates:
        hub_id = reference if looks_like_hub_id(reference) else hub_id_of_path(path)
        if hub_id:
            spelled = family_from_model_id(hub_id).size
            if spelled:
                return Derived(spelled, f"the base's Hub id {hub_id}")
    return None


# --------------------------------------------------------------------------------------------------
# Method


def _objective(lineage: Lineage) -> str | None:
    for source in (lineage.parameters, lineage.recipe or {}):
        for key in ("objective", "trainer", "loss_type", "stage"):
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, str) and value:
                return value
    return None


def method_of_lineage(lineage: Lineage) -> Derived | None:
    """The Method a record names: its merge method, training objective (SFT when none is recorded), or the
    adapter operation; for a merged adapter, the adapter's own Method."""
    operation = lineage.operation
    if operation in ("merge", "combine"):
        method = method_of_record(lineage.method or "")
        return Derived(method, f"the {operation} method {lineage.method!r}") if method else None
    if operation == "train":
        objective = _objective(lineage)
        method = method_of_record(objective) if objective else None
        if method is not None and method.kind == "training":
            return Derived(method, f"the training objective {objective!r}")
        return Derived(canonical_method("SFT"), "training without a recorded objective (SFT)")
    if operation == "adapter-merge":
        for parent in lineage.parents:
            if parent.role == "adapter" and parent.lineage is not None:
                inner = method_of_lineage(parent.lineage)
                # a trained adapter's objective; a combination of adapters merged into the base is that merge
                if inner is not None and isinstance(inner.value, Method) and inner.value.kind in ("training", "merge"):
                    return Derived(inner.value, f"the merged adapter's record ({inner.source})")
        return Derived(canonical_method("SFT"), "the merged adapter carries no training record (SFT assumed)")
    if operation == "export":  # the same model in another format: its source's Method
        for parent in lineage.parents:
            if parent.lineage is not None:
                inner = method_of_lineage(parent.lineage)
                if inner is not None:
                    return Derived(inner.value, f"the exported model's record ({inner.source})")
        return None
    if operation == "extract":
        return Derived(canonical_method("Extract"), "an adapter extracted from a fine-tune")
    if operation == "resize":
        return Derived(canonical_method("Resize"), "an adapter re-factored to another rank")
    return None


# --------------------------------------------------------------------------------------------------


def read_facts(folder: str | Path) -> FolderFacts:
    """Gather what ``folder`` says about itself; unknowns are listed in ``gaps``, never raised."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("no such model folder", where=str(folder), fix="give the folder mtool wrote")
    lineage = read_lineage(folder)
    config = read_json(folder / "config.json")
    adapter_config = read_json(folder / "adapter_config.json")
    is_adapter = adapter_config is not None or bool(lineage and lineage.is_adapter)
    facts = FolderFacts(folder=folder, lineage=lineage, config=config, adapter_config=adapter_config,
                        is_adapter=is_adapter)
    if lineage is None:
        facts.gaps.append("no lineage record (mtool-lineage.json): parents, method, recipe, seed and data are unknown")

    family = None
    if lineage is not None:
        root = lineage_root(lineage)
        if root is not None:
            family = family_of_reference(root.id, root.path)
    if family is None and adapter_config and adapter_config.get("base_model_name_or_path"):
        family = family_of_reference(str(adapter_config["base_model_name_or_path"]))
    if family is None and config:
        configured = family_from_config(config)
        if configured is not None:
            family = Derived(configured.as_base(), configured.note)
    if family is not None:
        facts.base, facts.family_source = family.value, family.source  # type: ignore[assignment]
    else:
        facts.gaps.append("the Family is unknown: no lineage root, no base model id and no model_type")

    if is_adapter:
        found = base_parameters(lineage, adapter_config)
        if isinstance(found, Derived) and isinstance(found.value, ParameterCount):
            facts.parameters, facts.size = found.value, size_label(found.value)
        elif found is not None:
            facts.size = str(found.value)
        if found is not None:
            facts.size_source = found.source
    else:
        counted = _count(folder)
        if counted is None and lineage is not None and lineage.parameter_count:
            counted = ParameterCount(lineage.parameter_count)
            facts.size_source = "the lineage record"
        elif counted is not None:
            facts.size_source = "the weights"
        if counted is not None:
            facts.parameters, facts.size = counted, size_label(counted)
    if facts.size is None:
        facts.gaps.append("the Size is unknown: no weights to count"
                          + (" for the adapter's base" if is_adapter else ""))

    if lineage is not None:
        method = method_of_lineage(lineage)
        if method is not None:
            facts.method, facts.method_source = method.value, method.source  # type: ignore[assignment]
        elif lineage.operation != "base":
            facts.gaps.append(f"the Method of {lineage.operation} {lineage.method!r} is not in the closed list")
    return facts
