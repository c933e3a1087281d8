"""``mtool card`` and :func:`write_card`: a Hub-ready README.md derived from a folder's lineage record.

The YAML front matter is built with ``huggingface_hub.ModelCardData`` (so ``ModelCard.load`` reads it back):
``base_model`` (Hub ids of the direct parents only; a list for merges), ``base_model_relation``,
``library_name``, ``license`` (+ ``license_name`` / ``license_link`` for ``other``), ``tags``, ``datasets``,
``pipeline_tag``, the keys llama.cpp's converter (gguf-py ``Metadata``) reads to rebuild the name:
``model_name``, ``model_basename``, ``model_size_label``, ``model_finetune``, ``model_version``, and the
evaluations of the folder (``mtool eval``) as ``model-index``, the results the Hub shows.

The body (:mod:`mtool.naming.card_body`): a summary, the lineage tree, the recipe or training configuration,
the seed, the training data, hyperparameters, final metrics and loss plot, evaluations, the search that chose a
merge's recipe, a usage snippet, the license's
notices and attributions, and the gaps (what the folder does not document). Nothing is a placeholder: a
missing fact is listed as missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.errors import InputError, OutputExistsError
from mtool.io.folders import card_metadata
from mtool.lineage import Lineage, Parent, declared_license, read_lineage, write_lineage
from mtool.naming.card_body import pipeline_tag, render_body
from mtool.naming.card_gguf import GGUF_TAGS, is_gguf_folder
from mtool.naming.card_results import eval_results
from mtool.naming.check import parse_name
from mtool.naming.facts import FolderFacts, base_parent, hub_id_of_path, output_name, read_facts
from mtool.naming.license import LicenseResolution, ParentLicense, normalize_license, publisher_license, resolve_license
from mtool.naming.publishable import display_reference
from mtool.naming.schema import ModelName
from mtool.naming.suggest import suggest_from_facts

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

CARD_FILENAME = "README.md"

_OPERATION_TAGS = {
    "merge": ["merge", "mergekit"],
    "combine": ["lora", "peft", "adapter-combination"],
    "adapter-merge": ["lora-merged"],
    "extract": ["lora", "peft", "lora-extraction"],
    "resize": ["lora", "peft"],
}


@dataclass
class CardContent:
    """Everything the card says, gathered before rendering."""

    facts: FolderFacts
    name: ModelName | None
    title: str
    repo_id: str
    license: LicenseResolution
    base_models: list[str] = field(default_factory=list)
    local_parents: list[Parent] = field(default_factory=list)
    relation: str | None = None
    gaps: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Licenses of the parents


def _cached_hub_card(repo_id: str, revision: str | None) -> dict:
    """The front matter of a Hub model's README.md when it is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CARD_FILENAME, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id or cache is "not cached"
        return {}
    return card_metadata(Path(found)) if isinstance(found, str) else {}


def _current_record(parent: Parent) -> Lineage | None:
    """The parent's record as its folder holds it now, when that folder still holds the same weights (a later
    license fix then shows up); else the record embedded when the output was made."""
    if parent.files and parent.path and Path(parent.path).is_dir():
        try:
            current = read_lineage(parent.path)
        except InputError:
            current = None
        if current is not None and current.outputs == parent.files:
            return current
    return parent.lineage


def parent_license(parent: Parent) -> ParentLicense:
    """A parent's license. An mtool output (a record with parents): the license its publisher declared for it,
    else the resolution of its own parents' licenses, from its current record. Any other model: its card as it is
    now (local folder or cached Hub card), else what the record noted, else its publisher's known license
    (reported as inferred); unknown when none of these says."""
    shown = display_reference(parent.id, is_hub=parent.is_hub)
    record = _current_record(parent)
    if record is not None and record.parents:
        if record.license:
            return ParentLicense(shown, record.license)
        inner = resolve_license(license_parents(record))
        return ParentLicense(shown, inner.license, inner.license_name, inner.license_link)
    front: dict = {}
    if parent.path and Path(parent.path).is_dir():
        front = card_metadata(Path(parent.path) / CARD_FILENAME)
    hub_id = parent.id if parent.is_hub else hub_id_of_path(parent.path)
    if not front and hub_id:
        front = _cached_hub_card(hub_id, parent.revision)
    declared = front.get("license") or parent.license
    if declared:
        return ParentLicense(shown, str(declared), front.get("license_name"), front.get("license_link"))
    if hub_id and publisher_license(hub_id):
        return ParentLicense(shown, publisher_license(hub_id), inferred=True)
    return ParentLicense(shown, None)


def license_parents(lineage: Lineage) -> list[ParentLicense]:
    """The licenses the output inherits: every direct parent's but a tokenizer donor's."""
    return [parent_license(p) for p in lineage.parents if p.role != "tokenizer"]


# --------------------------------------------------------------------------------------------------
# Front matter


def _hub_parents(lineage: Lineage, facts: FolderFacts) -> list[Parent]:
    """The parents the Hub's model tree links to: the models of a merge, the base of anything else (for an
    adapter made from adapters, their base)."""
    direct = [p for p in lineage.parents if p.role != "tokenizer"]
    if lineage.operation == "merge" and not facts.is_adapter:
        return [p for p in direct if p.role in ("model", "base")]
    bases = [p for p in direct if p.role == "base"]
    if not bases:
        for parent in direct:
            if parent.role == "adapter" and parent.lineage is not None:
                found = base_parent(parent.lineage)
                if found is not None:
                    bases.append(found)
    return bases or [p for p in direct if p.role == "model"]


def _tags(content: CardContent) -> list[str]:
    facts = content.facts
    lineage = facts.lineage
    tags = ["mtool"]
    if lineage is not None:
        tags += _OPERATION_TAGS.get(lineage.operation, [])
        if lineage.operation == "train":
            tags += ["peft", "lora"] if facts.is_adapter else ["fine-tune"]
        if lineage.method in ("qlora", "dora") and (facts.is_adapter or lineage.operation == "train"):
            tags.append(lineage.method)
    elif facts.is_adapter:
        tags += ["peft", "lora"]
    if facts.method is not None:
        tags.append(facts.method.name.lower())
    return list(dict.fromkeys(tags))


def front_matter(content: CardContent) -> dict[str, object]:
    """The card's metadata as a plain dict (ModelCardData's keyword arguments)."""
    facts = content.facts
    data: dict[str, object] = {}
    if content.base_models:
        merge = facts.lineage is not None and facts.lineage.operation == "merge" and not facts.is_adapter
        data["base_model"] = content.base_models if merge or len(content.base_models) > 1 else content.base_models[0]
        if content.relation:
            data["base_model_relation"] = content.relation
    gguf = is_gguf_folder(facts.folder, facts.lineage)
    data["library_name"] = "gguf" if gguf else "peft" if facts.is_adapter else "transformers"
    data.update(content.license.front_matter)
    data["tags"] = _tags(content) + (list(GGUF_TAGS) if gguf else [])
    lineage = facts.lineage
    if lineage is not None and lineage.dataset is not None and lineage.dataset.is_hub:
        data["datasets"] = [lineage.dataset.id]
    task = pipeline_tag(facts)
    if task:
        data["pipeline_tag"] = task
    if content.name is not None:
        data.update(content.name.gguf_fields())
    else:
        data["model_name"] = content.title
        if facts.base is not None:
            data["model_basename"] = facts.base.family
        if facts.size:
            data["model_size_label"] = facts.size
    if lineage is not None and lineage.evaluations:
        data["eval_results"] = eval_results(lineage)  # written as model-index, named by model_name
    return data


# --------------------------------------------------------------------------------------------------


def _front_matter_yaml(data: "ModelCardData") -> str:
    """The front matter as ``ModelCardData`` writes it, with ``model_name`` kept at the top level when there are
    evaluation results: huggingface_hub moves it into ``model-index`` (where the Hub reads it), and llama.cpp's
    converter reads it at the top."""
    if not data.eval_results:
        return data.to_yaml()
    from huggingface_hub.utils import yaml_dump

    fields = data.to_dict()
    ordered = {"model_name": data.model_name} if "model_basename" not in fields else {}
    for key, value in fields.items():
        if key == "model_basename":
            ordered["model_name"] = data.model_name
        ordered[key] = value
    return yaml_dump(ordered, sort_keys=False).strip()


def build_card(folder: str | os.PathLike, *, name: str | None = None, license: str | None = None,
               repo_id: str | None = None) -> tuple[CardContent, str]:
    """Gather the card's content for ``folder`` and render the README text."""
    facts = read_facts(folder)
    gaps = list(facts.gaps)
    model_name: ModelName | None = None
    if name is not None:
        model_name = parse_name(name)
    else:
        try:
            model_name = suggest_from_facts(facts).name
        except InputError as error:
            gaps.append(f"no standardized name: {error.what}")
    lineage = facts.lineage
    override = license or (lineage.license if lineage is not None else None)
    if lineage is not None and lineage.parents:
        resolution = resolve_license(license_parents(lineage), override=override)
        hub_parents = _hub_parents(lineage, facts)
        base_models = list(dict.fromkeys(p.id for p in hub_parents if p.is_hub))
        local = [p for p in lineage.parents if not p.is_hub and p.role != "tokenizer"]
        for parent in lineage.parents:
            if parent.is_hub and not parent.revision:
                gaps.append(f"the revision of {parent.id} was not recorded")
        if lineage.operation == "train" and lineage.seed is None:
            gaps.append("the training seed was not recorded")
        if lineage.dataset is None and lineage.operation == "train":
            gaps.append("the training data set was not recorded")
    else:
        own = declared_license(facts.folder)
        resolution = resolve_license([ParentLicense(output_name(facts.folder), own)], override=override)
        base_models, local = [], []
    relation = None
    if base_models:
        if model_name is not None:
            relation = model_name.relation
        elif facts.is_adapter:
            relation = "adapter"
        elif facts.method is not None:
            relation = facts.method.relation
    content = CardContent(facts=facts, name=model_name,
                          title=model_name.format() if model_name else output_name(facts.folder),
                          repo_id=repo_id or (model_name.format() if model_name else output_name(facts.folder)),
                          license=resolution, base_models=base_models, local_parents=local, relation=relation,
                          gaps=gaps)
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**front_matter(content))
    text = f"---\n{_front_matter_yaml(data)}\n---\n\n{render_body(content)}"
    ModelCard(text)  # validates the front matter the way the Hub's client reads it
    return content, text


def written_by_mtool(card: Path) -> bool:
    """Whether the card at ``card`` is one mtool wrote (its front matter is tagged ``mtool``): derived from the
    lineage record, so it may be written again; a card written by hand is never replaced without --force."""
    tags = card_metadata(card).get("tags") or []
    return isinstance(tags, list) and "mtool" in tags


def write_card(folder: str | os.PathLike, *, name: str | None = None, license: str | None = None,
               repo_id: str | None = None, out: str | os.PathLike | None = None, force: bool = True) -> Path:
    """Write the model card of ``folder`` (default ``folder/README.md``) and return its path.

    ``name`` overrides the suggested name (it must follow the schema), ``license`` the license resolved from the
    parents (and is recorded in the folder's lineage record, so later cards and descendants keep it), ``repo_id``
    the id used in the usage snippet (default: the name). Library callers (merge, adapters, train) write into their
    own staging folder and overwrite; ``force=False`` refuses to replace an existing card that mtool did not write.
    """
    folder = Path(folder)
    target = Path(out) if out is not None else folder / CARD_FILENAME
    if target.exists() and not force and not written_by_mtool(target):
        raise OutputExistsError(f"{target} exists and was not written by mtool", where=str(target),
                                fix="pass --force to replace it, --out to write elsewhere, or --stdout to print it")
    _, text = build_card(folder, name=name, license=license, repo_id=repo_id)
    if license is not None:
        _record_license(folder, license)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, target)
    return target


def _record_license(folder: Path, license: str) -> None:
    """Keep the publisher's choice of license in the folder's lineage record (when it has one)."""
    record = read_lineage(folder)
    if record is not None and record.license != license:
        record.license = normalize_license(license) or license
        write_lineage(folder, record)
def refresh_card(folder: str | os.PathLike) -> Path | None:
    """Write the card of ``folder`` again from its lineage record (after an evaluation was added to it), keeping
    the name and license the card had; None, and nothing written, when the folder has no card written by mtool
    (a card written by hand, or none because it was turned off, is left alone)."""
    folder = Path(folder)
    front = card_metadata(folder / CARD_FILENAME)
    if "mtool" not in (front.get("tags") or []):
        return None
    name = front.get("model_name")
    try:
        name = parse_name(str(name)).format() if name else None
    except InputError:
        name = None
    license = front.get("license")
    content, _ = build_card(folder, name=name)
    if license is not None and license == content.license.license:
        license = None  # the resolved license: no override to keep
    return write_card(folder, name=name, license=license)
