"""The Label of a name: what distinguishes this artifact from its base and its siblings.

Where it comes from, first found:

1. the folder's own name, when it already follows the schema (the Label chosen when it was named);
2. its lineage record: a training run's (first) data set, the labels of the models a merge merged (their names'
   Labels, else their own records', else the words of their names that all of them do not share), the adapter
   of an adapter merge or a resize, the fine-tune of an extraction; a merge whose recipe was searched
   (``mtool merge --search``) adds ``Searched``, to tell it from the merge of the recipe as written;
3. the words of the folder's name that are not family, size, version, method, variant or encoding.

A merge of parents labelled Capitals and Symbols is ``CapitalsSymbols`` (at most three labels, CamelCase); a word
every parent shares (``mtool-capitals``, ``mtool-symbols``) names none of them and is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from mtool.lineage import Lineage, Parent
from mtool.naming.check import check_name
from mtool.naming.facts import Derived, looks_like_hub_id, output_name
from mtool.naming.family import find_family, is_variant_word, split_model_id
from mtool.naming.methods import find_method
from mtool.naming.schema import camel_join, is_encoding, is_lora_marker, is_size_like, is_version_like, is_word

LABEL_MAX = 32
SEARCHED = "Searched"  # the Label's last word for a merge whose parameters were searched
MAX_MERGED_LABELS = 3
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow", ".safetensors", ".gguf")
_NOT_A_LABEL = ("hf", "model", "merge", "merged")


def reference_name(reference: str) -> str:
    """The name in a model or data reference: a Hub id's repository name, a local path's last part (a data file's
    extension dropped): ``Gryphe/MythoMax-L2-13b`` -> ``MythoMax-L2-13b``, ``/data/capitals.jsonl`` -> ``capitals``."""
    name = reference.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def distinctive_words(reference: str) -> list[str]:
    """The words of a model id / path / data set id that are not family, size, version, method, variant or
    encoding: ``Gryphe/MythoMax-L2-13b`` -> ``["MythoMax"]``."""
    tokens = split_model_id(reference if looks_like_hub_id(reference) else reference_name(reference))
    known = find_family(tokens)
    if known is not None:
        tokens = tokens[:known.start] + tokens[known.end:]
    return [t for t in tokens
            if not (is_size_like(t) or is_version_like(t) or is_encoding(t) or is_lora_marker(t)
                    or find_method(t) or is_variant_word(t) or t.lower() in _NOT_A_LABEL)
            and re.fullmatch(r"[A-Za-z0-9]+", t)]


def label_from_words(words: list[str]) -> str | None:
    """``["capitals", "symbols"]`` -> ``CapitalsSymbols``; None when no valid Label results."""
    label = camel_join(words)[:LABEL_MAX]
    return label if label and is_word(label) and any(c.isalpha() for c in label) else None


def label_of_name(reference: str) -> str | None:
    """The Label of a reference whose name follows the schema (``.../Llama-558K-Capitals-SFT-v1.0``)."""
    name = check_name(reference_name(reference)).model_name()
    return name.label if name is not None else None


def merged_parents(lineage: Lineage) -> list[Parent]:
    """The parents a merge or combination actually mixed: its models and adapters, and the base too when the
    recipe lists it among the models (SLERP's first end), not when it is only the task vectors' origin."""
    listed = set()
    recipe = lineage.recipe or {}
    for entry in recipe.get("models") or []:
        listed.add(str(entry.get("model", "")) if isinstance(entry, dict) else str(entry))
    for output_slice in recipe.get("slices") or []:
        for source in output_slice.get("sources") or [] if isinstance(output_slice, dict) else []:
            listed.add(str(source.get("model", "")))
    return [p for p in lineage.parents
            if p.role in ("model", "adapter") or (p.role == "base" and any(m.startswith(p.id) for m in listed))]


def _parent_labels(parents: list[Parent]) -> list[str]:
    """Each parent's Label: its name's, else its record's, else its own words minus those every parent shares."""
    words = [distinctive_words(p.id) for p in parents]
    shared = set.intersection(*(set(w) for w in words)) if len(words) > 1 else set()
    labels = []
    for parent, own_words in zip(parents, words):
        found = label_of_name(parent.id)
        if found is None and parent.lineage is not None:
            inner = label_of_record(parent.lineage)
            found = str(inner.value) if inner is not None else None
        if found is None:
            found = label_from_words([w for w in own_words if w not in shared][:1])
        if found is not None and found not in labels:
            labels.append(found)
    return labels[:MAX_MERGED_LABELS]


def _training_data(lineage: Lineage) -> str | None:
    """The first data set a training run read (the others are often general data replayed against forgetting)."""
    data = (lineage.recipe or {}).get("data")
    paths = data.get("path") if isinstance(data, dict) else None
    if isinstance(paths, list) and paths:
        return str(paths[0])
    return lineage.dataset.id.split(", ")[0] if lineage.dataset is not None else None


def label_of_record(lineage: Lineage) -> Derived | None:
    """The Label a lineage record implies (see the module docstring), or None."""
    if lineage.operation in ("train", "base"):
        data = _training_data(lineage)
        label = label_from_words(distinctive_words(data)) if data else None
        return Derived(label, f"the training data {data}") if label else None
    roles = {"adapter-merge": ("adapter",), "resize": ("adapter",), "extract": ("model",)}
    parents = (merged_parents(lineage) if lineage.operation in ("merge", "combine")
               else [p for p in lineage.parents if p.role in roles.get(lineage.operation, ("model", "adapter"))])
    if not parents:
        return None
    label = label_from_words(_parent_labels(parents))
    if label and lineage.operation == "merge" and lineage.search is not None:
        label = camel_join([label, SEARCHED])
    what = {"merge": "merged models", "combine": "combined adapters", "adapter-merge": "merged adapter",
            "resize": "resized adapter", "extract": "fine-tune"}.get(lineage.operation, "parents")
    return Derived(label, f"the {what} ({', '.join(p.id for p in parents)})") if label else None


def derive_label(folder: Path, lineage: Lineage | None) -> Derived | None:
    """The Label of the artifact in ``folder``: its own standardized name's, its record's, else its name's words."""
    name = output_name(folder)
    own = label_of_name(name)
    if own is not None:
        return Derived(own, f"the folder's name {name}")
    if lineage is not None:
        found = label_of_record(lineage)
        if found is not None:
            return found
    label = label_from_words(distinctive_words(name))
    return Derived(label, f"the folder name {name}") if label else None
