"""``mtool card`` and :func:`write_card`: a Hub-ready README.md derived from a folder's lineage record.

The YAML front matter is built with ``huggingface_hub.ModelCardData`` (so ``ModelCard.load`` reads it back):
``base_model`` (Hub ids of the direct parents only; a list for merges), ``base_model_relation``,
``library_name``, ``license`` (+ ``license_name`` / ``license_link`` for ``other``), ``tags``, ``datasets``,
``pipeline_tag``, and the keys llama.cpp's converter (gguf-py ``Metadata``) reads to rebuild the name:
``model_name``, ``model_basename``, ``model_size_label``, ``model_finetune``, ``model_version``.

The body: a summary, the lineage tree (parents with revisions and weight hashes, through every embedded
record), the recipe or training configuration, the seed, the training data, hyperparameters, final
metrics and loss plot, a usage snippet, the license's notices and attributions, and the gaps (what the
folder does not document). Nothing is a placeholder: a missing fact is listed as missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mtool.errors import InputError, OutputExistsError
from mtool.lineage import Lineage, Parent, declared_license
from mtool.naming.facts import FolderFacts, base_parent, hub_id_of_path, output_name, read_facts, read_json
from mtool.naming.license import LicenseResolution, ParentLicense, publisher_license, resolve_license
from mtool.naming.schema import ModelName, parse_name
from mtool.naming.suggest import suggest_from_facts

CARD_FILENAME = "README.md"
LOSS_PLOT = "loss.png"
_VALUE_MAX = 120

_OPERATION_TAGS = {
    "merge": ["merge", "mergekit"],
    "combine": ["lora", "peft", "adapter-combination"],
    "adapter-merge": ["lora-merged"],
    "extract": ["lora", "peft", "lora-extraction"],
    "resize": ["lora", "peft"],
}
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "text-generation"), ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"),
)
_PEFT_TASKS = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification",
               "SEQ_2_SEQ_LM": "text2text-generation", "TOKEN_CLS": "token-classification",
               "QUESTION_ANS": "question-answering"}


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


def _front_matter_of(readme: Path) -> dict:
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - an unreadable parent card only costs its license details
        return {}


def _cached_hub_card(repo_id: str, revision: str | None) -> dict:
    """The front matter of a Hub model's README.md when it is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CARD_FILENAME, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id or cache is "not cached"
        return {}
    return _front_matter_of(Path(found)) if isinstance(found, str) else {}


def parent_license(parent: Parent) -> ParentLicense:
    """A parent's license: declared in the record, in its card (local folder or cached Hub card), resolved
    from its own embedded record, else its publisher's known license (reported as inferred)."""
    front: dict = {}
    if parent.path and Path(parent.path).is_dir():
        front = _front_matter_of(Path(parent.path) / CARD_FILENAME)
    hub_id = parent.id if parent.is_hub else hub_id_of_path(parent.path)
    if not front and hub_id:
        front = _cached_hub_card(hub_id, parent.revision)
    declared = parent.license or front.get("license")
    if declared:
        return ParentLicense(parent.id, str(declared), front.get("license_name"), front.get("license_link"))
    if parent.lineage is not None and parent.lineage.parents:
        inner = resolve_license(license_parents(parent.lineage))
        return ParentLicense(parent.id, inner.license, inner.license_name, inner.license_link)
    if hub_id and publisher_license(hub_id):
        return ParentLicense(parent.id, publisher_license(hub_id), inferred=True)
    return ParentLicense(parent.id, None)


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


def pipeline_tag(facts: FolderFacts) -> str | None:
    if facts.adapter_config is not None:
        return _PEFT_TASKS.get(str(facts.adapter_config.get("task_type") or ""))
    for architecture in (facts.config or {}).get("architectures") or []:
        for suffix, task in _ARCHITECTURE_TASKS:
            if str(architecture).endswith(suffix):
                return task
    return None


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
    data["library_name"] = "peft" if facts.is_adapter else "transformers"
    data.update(content.license.front_matter)
    data["tags"] = _tags(content)
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
    return data


# --------------------------------------------------------------------------------------------------
# Body


def _code(text: object) -> str:
    return f"`{str(text).replace('`', '')}`"


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _VALUE_MAX else text[:_VALUE_MAX - 3] + "..."


def _parent_line(parent: Parent) -> str:
    where = "Hub" if parent.is_hub else "local folder, not on the Hub"
    details = [where]
    if parent.revision:
        details.append(f"revision {_code(parent.revision)}")
    if parent.weight is not None:
        details.append(f"weight {parent.weight:g}")
    if parent.license:
        details.append(f"license {_code(parent.license)}")
    return f"**{parent.role}** {_code(parent.id)} ({', '.join(details)})"


def lineage_tree(lineage: Lineage, depth: int = 0) -> list[str]:
    """The record as a nested Markdown list: each parent, its weight files' sha256, its own record."""
    indent = "  " * depth
    lines: list[str] = []
    for parent in lineage.parents:
        lines.append(f"{indent}- {_parent_line(parent)}")
        for filename, digest in sorted(parent.files.items()):
            lines.append(f"{indent}  - {_code(filename)} sha256 {_code(digest)}")
        if parent.lineage is not None:
            inner = parent.lineage
            method = f" ({inner.method})" if inner.method else ""
            lines.append(f"{indent}  - made by **{inner.operation}**{method} with {inner.tool} {inner.tool_version}"
                         f"{', seed ' + str(inner.seed) if inner.seed is not None else ''} from:")
            lines += lineage_tree(inner, depth + 2)
    return lines


def _summary(content: CardContent) -> str:
    facts, lineage = content.facts, content.facts.lineage
    if lineage is None:
        kind = "a PEFT adapter" if facts.is_adapter else "a model"
        return (f"{content.title} is {kind} whose folder carries no mtool lineage record: this card is built from "
                "its config files and weights, and its origin is not documented (see Gaps).")
    method = facts.method.name if facts.method else lineage.method or lineage.operation
    roles = {role: [p.id for p in lineage.parents if p.role == role] for role in ("base", "model", "adapter")}
    base = roles["base"][0] if roles["base"] else None
    data = f" on {_code(lineage.dataset.id)}" if lineage.dataset else ""
    if lineage.operation == "merge":
        models = ", ".join(_code(m) for m in dict.fromkeys(roles["model"] + roles["base"]))
        on_base = f", with {_code(base)} as the base" if base else ""
        return f"{content.title} is a {method} merge of {models}{on_base}, made with mtool."
    if lineage.operation == "combine":
        adapters = ", ".join(_code(a) for a in roles["adapter"])
        return f"{content.title} is a {method} combination of the LoRA adapters {adapters}, made with mtool."
    if lineage.operation == "train":
        kind = (lineage.method or "lora").upper().replace("DORA", "DoRA").replace("QLORA", "QLoRA").replace("LORA", "LoRA")
        what = f"a {kind} adapter for" if facts.is_adapter else "a fine-tune of"
        return f"{content.title} is {what} {_code(base or 'its base')}, trained with {method}{data}, made with mtool."
    if lineage.operation == "adapter-merge":
        adapters = ", ".join(_code(a) for a in roles["adapter"])
        return (f"{content.title} is {_code(base)} with the adapter {adapters} merged into its weights "
                "(W + s·B·A), made with mtool.")
    if lineage.operation == "extract":
        tuned = ", ".join(_code(m) for m in roles["model"])
        return (f"{content.title} is a LoRA adapter extracted from {tuned} relative to {_code(base)} "
                f"(truncated SVD of the weight difference), made with mtool.")
    if lineage.operation == "resize":
        adapters = ", ".join(_code(a) for a in roles["adapter"])
        rank = lineage.parameters.get("rank")
        return f"{content.title} is the adapter {adapters} re-factored{f' to rank {rank}' if rank else ''} with mtool."
    return f"{content.title} was made by mtool ({lineage.operation})."


def _table(rows: dict[str, object], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    for key, value in rows.items():
        if value is None:
            continue
        lines.append(f"| {key} | {_short(value).replace('|', '/')} |")
    return lines


def _usage(content: CardContent) -> list[str]:
    facts = content.facts
    task = pipeline_tag(facts) or "text-generation"
    model_id = content.repo_id
    chat = bool((facts.folder / "chat_template.jinja").is_file()
                or (read_json(facts.folder / "tokenizer_config.json") or {}).get("chat_template"))
    prompt = (['messages = [{"role": "user", "content": "Hello! What can you help me with?"}]',
               'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",',
               '                                       return_dict=True).to(model.device)']
              if chat else ['inputs = tokenizer("Model merging is", return_tensors="pt").to(model.device)'])
    generate = ["outputs = model.generate(**inputs, max_new_tokens=128)",
                'print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    if task != "text-generation":
        return ["```python", "from transformers import pipeline", "",
                f'classifier = pipeline("{task}", model="{model_id}")', 'print(classifier("mtool writes model cards."))',
                "```"]
    if facts.is_adapter:
        base = content.base_models[0] if content.base_models else None
        base_reference = base or str((facts.adapter_config or {}).get("base_model_name_or_path") or "")
        lines = ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 "", f'base_id = "{base_reference}"', f'adapter_id = "{model_id}"',
                 "tokenizer = AutoTokenizer.from_pretrained(base_id)",
                 'model = AutoModelForCausalLM.from_pretrained(base_id, dtype="auto", device_map="auto")',
                 "model = PeftModel.from_pretrained(model, adapter_id)", *prompt, *generate, "```"]
        if not base:
            lines.append(f"The base is not on the Hub: {_code(base_reference)} is the folder the adapter was made "
                         "for.")
        return lines
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model_id = "{model_id}"', "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")',
            *prompt, *generate, "```"]


def _license_section(content: CardContent) -> list[str]:
    resolution = content.license
    shown = resolution.license_name if resolution.license == "other" and resolution.license_name else resolution.license
    lines = ["## License", ""]
    link = f" ({resolution.license_link})" if resolution.license == "other" and resolution.license_link else ""
    lines.append(f"This model is released under {_code(shown)}{link}, the most restrictive of its parents' licenses."
                 if content.facts.lineage is not None else f"This model is released under {_code(shown)}{link}.")
    if resolution.non_commercial:
        lines += ["", "**Non-commercial use only**: a parent's license forbids commercial use."]
    for attribution in resolution.attributions:
        lines += ["", f"**{attribution}**"]
    if resolution.notices:
        lines += ["", "Notices of the parents' licenses:", ""] + [f"> {notice}" for notice in resolution.notices]
    if resolution.conditions:
        lines += ["", "Conditions inherited from the parents' licenses:", ""] + [f"- {c}" for c in resolution.conditions]
    if resolution.name_prefix:
        lines += ["", f"Its name must begin with {_code(resolution.name_prefix)}."]
    if resolution.reports:
        lines += ["", "To review before publishing:", ""] + [f"- {report}" for report in resolution.reports]
    return lines


def render_body(content: CardContent) -> str:
    facts, lineage = content.facts, content.facts.lineage
    lines = [f"# {content.title}", "", _summary(content), ""]
    if content.name is not None:
        n = content.name
        lines += ["## Name", "",
                  f"{_code(n.format())} follows the mtool naming schema: Family {_code(n.family)}, Size {_code(n.size)}"
                  + (f", BaseVariant {_code(n.base_variant)}" if n.base_variant else "")
                  + f", Label {_code(n.label)}, Method {_code(n.method)} (Hub relation {n.relation}), "
                  f"version {_code(n.version)}" + (", LoRA adapter" if n.lora else "") + ".", ""]
    model_rows: dict[str, object] = {
        "Family": facts.base.family if facts.base else None,
        "Size": f"{facts.size} ({facts.parameters.total:,} parameters)" if facts.parameters else facts.size,
        "Architecture": ", ".join((facts.config or {}).get("architectures") or []) or None,
        "Adapter": "PEFT LoRA" if facts.is_adapter else None,
    }
    if facts.adapter_config:
        targets = facts.adapter_config.get("target_modules")
        model_rows.update({"Rank": facts.adapter_config.get("r"), "Alpha": facts.adapter_config.get("lora_alpha"),
                           "Target modules": ", ".join(sorted(targets)) if isinstance(targets, list) else targets})
    if any(value is not None for value in model_rows.values()):
        lines += ["## Model", ""] + _table(model_rows, ("", "")) + [""]

    if lineage is not None:
        lines += ["## Lineage", "",
                  f"Made by **{lineage.operation}**{f' ({lineage.method})' if lineage.method else ''} with "
                  f"{lineage.tool} {lineage.tool_version} on {lineage.created}, from:", ""]
        lines += lineage_tree(lineage) + [""]
        if content.local_parents:
            lines += ["Parents that are local folders are listed above but not written as `base_model` ids: "
                      + ", ".join(_code(p.id) for p in content.local_parents) + ".", ""]
        if lineage.outputs:
            lines += ["Output files:", ""] + [f"- {_code(f)} sha256 {_code(d)}" for f, d in sorted(lineage.outputs.items())]
            lines.append("")
        if lineage.recipe:
            import yaml

            title = "Training configuration" if lineage.operation == "train" else "Recipe"
            lines += [f"## {title}", "", "```yaml", yaml.safe_dump(lineage.recipe, sort_keys=False).rstrip(), "```", ""]
            if lineage.operation == "merge":
                lines += ["Run it again with `mtool merge recipe.yaml OUTPUT` (or mergekit's `mergekit-yaml`).", ""]
        lines += ["## Reproducibility", ""]
        if lineage.seed is not None:
            lines.append(f"Random seed: {_code(lineage.seed)}.")
        elif lineage.operation == "train":
            lines.append("Random seed: not recorded.")
        else:
            lines.append("No random seed: this operation is deterministic.")
        lines.append("")
        if lineage.dataset is not None:
            d = lineage.dataset
            lines += ["## Training data", ""] + _table({
                "Data set": d.id, "Source": "Hub" if d.is_hub else "local file", "sha256": d.sha256,
                "Examples": d.examples, "Format": d.format}, ("", "")) + [""]
        if lineage.parameters:
            lines += ["## Hyperparameters" if lineage.operation == "train" else "## Parameters", ""]
            lines += _table(lineage.parameters, ("Name", "Value")) + [""]
        if lineage.metrics:
            lines += ["## Results", ""] + _table(lineage.metrics, ("Metric", "Value")) + [""]
    if (facts.folder / LOSS_PLOT).is_file():
        lines += ["![Training loss](loss.png)", ""]
    lines += ["## Usage", ""] + _usage(content) + [""]
    lines += _license_section(content) + [""]
    if content.gaps:
        lines += ["## Gaps", "", "This card could not document:", ""] + [f"- {gap}" for gap in content.gaps] + [""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------


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
    if lineage is not None:
        resolution = resolve_license(license_parents(lineage), override=license)
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
        resolution = resolve_license([ParentLicense(output_name(facts.folder), own)], override=license)
        base_models, local = [], []
    relation = None
    if base_models:
        if model_name is not None:
            relation = model_name.relation
        elif facts.is_adapter:
            relation = "adapter"
        elif facts.method is not None:
            relation = facts.method.relation
    content = CardContent(facts=facts, name=model_name, title=model_name.format() if model_name else output_name(facts.folder),
                          repo_id=repo_id or (model_name.format() if model_name else output_name(facts.folder)),
                          license=resolution, base_models=base_models, local_parents=local, relation=relation,
                          gaps=gaps)
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**front_matter(content))
    text = f"---\n{data.to_yaml()}\n---\n\n{render_body(content)}"
    ModelCard(text)  # validates the front matter the way the Hub's client reads it
    return content, text


def write_card(folder: str | os.PathLike, *, name: str | None = None, license: str | None = None,
               repo_id: str | None = None, out: str | os.PathLike | None = None, force: bool = True) -> Path:
    """Write the model card of ``folder`` (default ``folder/README.md``) and return its path.

    ``name`` overrides the suggested name (it must follow the schema), ``license`` the license resolved
    from the parents, ``repo_id`` the id used in the usage snippet (default: the name). Library callers
    (merge, adapters, train) write into their own staging folder and overwrite; ``force=False`` refuses to
    replace an existing file.
    """
    folder = Path(folder)
    target = Path(out) if out is not None else folder / CARD_FILENAME
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists", where=str(target),
                                fix="pass --force to replace it or --out to write elsewhere")
    _, text = build_card(folder, name=name, license=license, repo_id=repo_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, target)
    return target
