"""The body of a model card (the Markdown below the front matter), rendered from a :class:`CardContent`.

Sections: the summary, the name's parts, the model, the lineage tree (parents with revisions and weight hashes,
through every embedded record), the recipe or training configuration, reproducibility (the seed), the training
data, parameters, results and loss plot, evaluations and the search that chose a merge's recipe
(:mod:`mtool.naming.card_results`), usage, the license with its notices and attributions, and the gaps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mtool.lineage import Lineage, Parent
from mtool.naming.card_gguf import gguf_file_table, gguf_files, gguf_usage, is_gguf_folder
from mtool.naming.card_results import evaluation_section, search_section
from mtool.naming.facts import FolderFacts, read_json
from mtool.naming.label import merged_parents
from mtool.naming.publishable import display_reference, for_people, without_local_paths

if TYPE_CHECKING:
    from mtool.naming.card import CardContent

LOSS_PLOT = "loss.png"
_VALUE_MAX = 120
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "text-generation"), ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"),
)
_PEFT_TASKS = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification",
               "SEQ_2_SEQ_LM": "text2text-generation", "TOKEN_CLS": "token-classification",
               "QUESTION_ANS": "question-answering"}


def pipeline_tag(facts: FolderFacts) -> str | None:
    if is_gguf_folder(facts.folder, facts.lineage):
        return "text-generation"  # every architecture mtool exports to GGUF is a causal language model
    if facts.adapter_config is not None:
        return _PEFT_TASKS.get(str(facts.adapter_config.get("task_type") or ""))
    for architecture in (facts.config or {}).get("architectures") or []:
        for suffix, task in _ARCHITECTURE_TASKS:
            if str(architecture).endswith(suffix):
                return task
    return None


def _code(text: object) -> str:
    return f"`{str(text).replace('`', '')}`"


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _VALUE_MAX else text[:_VALUE_MAX - 3] + "..."


def _shown(parent: Parent) -> str:
    """A parent as the card names it: its Hub id, or a local folder's name."""
    return display_reference(parent.id, is_hub=parent.is_hub)


def _parent_line(parent: Parent) -> str:
    where = "Hub" if parent.is_hub else "local folder, not on the Hub"
    details = [where]
    if parent.revision:
        details.append(f"revision {_code(parent.revision)}")
    if parent.weight is not None:
        details.append(f"weight {parent.weight:g}")
    if parent.license:
        details.append(f"license {_code(parent.license)}")
    return f"**{parent.role}** {_code(_shown(parent))} ({', '.join(details)})"


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
            made = (f"{indent}  - made by **{inner.operation}**{method} with {inner.tool} {inner.tool_version}"
                    f"{', seed ' + str(inner.seed) if inner.seed is not None else ''}")
            lines.append(made + (" from:" if inner.parents else ""))
            lines += lineage_tree(inner, depth + 2)
    return lines


def _summary(content: CardContent) -> str:
    facts, lineage = content.facts, content.facts.lineage
    if lineage is None:
        kind = "a PEFT adapter" if facts.is_adapter else "a model"
        return (f"{content.title} is {kind} whose folder carries no mtool lineage record: this card is built from "
                "its config files and weights, and its origin is not documented (see Gaps).")
    method = facts.method.name if facts.method else lineage.method or lineage.operation
    roles = {role: [_shown(p) for p in lineage.parents if p.role == role] for role in ("base", "model", "adapter")}
    base = roles["base"][0] if roles["base"] else None
    data = f" on {_code(without_local_paths(lineage.dataset.id))}" if lineage.dataset else ""
    if lineage.operation == "merge":
        merged = [_shown(p) for p in merged_parents(lineage) if p.role != "adapter"]
        models = ", ".join(_code(m) for m in dict.fromkeys(merged))
        on_base = f", with {_code(base)} as the base" if base and base not in merged else ""
        return f"{content.title} is a {method} merge of {models}{on_base}, made with mtool."
    if lineage.operation == "combine":
        adapters = ", ".join(_code(a) for a in roles["adapter"])
        return f"{content.title} is a {method} combination of the LoRA adapters {adapters}, made with mtool."
    if lineage.operation == "train":
        kind = ((lineage.method or "lora").upper()
                .replace("DORA", "DoRA").replace("QLORA", "QLoRA").replace("LORA", "LoRA"))
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
    if lineage.operation == "export":
        source = ", ".join(_code(p.id if p.is_hub else Path(p.path or p.id).name) for p in lineage.parents)
        types = ", ".join(lineage.parameters.get("types") or [])
        return (f"{content.title} is {source} as GGUF files ({types}) for llama.cpp, Ollama and LM Studio, "
                "made with mtool.")
    if lineage.operation == "resize":
        adapters = ", ".join(_code(a) for a in roles["adapter"])
        rank = lineage.parameters.get("rank")
        return f"{content.title} is the adapter {adapters} re-factored{f' to rank {rank}' if rank else ''} with mtool."
    if lineage.operation == "base":
        return f"{content.title} is a base model pre-trained with mtool{data}."
    return f"{content.title} was made by mtool ({lineage.operation})."


def _table(rows: dict[str, object], header: tuple[str, str]) -> list[str]:
    """A two-column Markdown table; values without local paths, numbers rounded for people."""
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    for key, value in rows.items():
        if value is None:
            continue
        lines.append(f"| {key} | {_short(for_people(without_local_paths(value))).replace('|', '/')} |")
    return lines


def _usage(content: CardContent) -> list[str]:
    facts = content.facts
    if is_gguf_folder(facts.folder, facts.lineage):
        return gguf_usage(facts.folder, gguf_files(facts.folder, facts.lineage), content.repo_id)
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
                f'classifier = pipeline("{task}", model="{model_id}")',
                'print(classifier("mtool writes model cards."))', "```"]
    if facts.is_adapter:
        base = content.base_models[0] if content.base_models else None
        base_reference = base or display_reference(str((facts.adapter_config or {}).get("base_model_name_or_path")
                                                       or ""))
        lines = ["```python", "from peft import PeftModel",
                 "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 "", f'base_id = "{base_reference}"', f'adapter_id = "{model_id}"',
                 "tokenizer = AutoTokenizer.from_pretrained(base_id)",
                 'model = AutoModelForCausalLM.from_pretrained(base_id, dtype="auto", device_map="auto")',
                 "model = PeftModel.from_pretrained(model, adapter_id)", *prompt, *generate, "```"]
        if not base:
            lines.append(f"The base is not on the Hub: {_code(base_reference)} is the name of the local folder the "
                         "adapter was made for; use its path.")
        return lines
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model_id = "{model_id}"', "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")',
            *prompt, *generate, "```"]


def _license_section(content: CardContent) -> list[str]:
    resolution = content.license
    lines = ["## License", ""]
    if resolution.license is None:
        undeclared = ", ".join(_code(display_reference(p)) for p in resolution.undeclared) or "a parent"
        lines.append(f"The license is **unknown**: {undeclared} declares none. Before publishing, find the license "
                     "and either declare it in that model's card (`license:` in its README.md front matter) and "
                     "run `mtool card` again, or pass it with `mtool card --license ID`.")
    else:
        shown = (resolution.license_name if resolution.license == "other" and resolution.license_name
                 else resolution.license)
        link = f" ({resolution.license_link})" if resolution.license == "other" and resolution.license_link else ""
        if resolution.overridden:
            why = ", chosen by its publisher (`mtool card --license`)"
        elif content.facts.lineage is not None and content.facts.lineage.parents:
            why = ", the most restrictive of its parents' licenses"
        else:
            why = ""
        lines.append(f"This model is released under {_code(shown)}{link}{why}.")
    if resolution.non_commercial:
        lines += ["", "**Non-commercial use only**: a parent's license forbids commercial use."]
    for attribution in resolution.attributions:
        lines += ["", f"**{attribution}**"]
    if resolution.notices:
        lines += ["", "Notices of the parents' licenses:", ""] + [f"> {notice}" for notice in resolution.notices]
    if resolution.conditions:
        lines += (["", "Conditions inherited from the parents' licenses:", ""]
                  + [f"- {c}" for c in resolution.conditions])
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
    gguf = is_gguf_folder(facts.folder, facts.lineage)
    if gguf and lineage is not None:
        model_rows["Architecture"] = f"{lineage.parameters.get('architecture')} (llama.cpp)"
        model_rows["Tokenizer"] = lineage.parameters.get("tokenizer")
    if any(value is not None for value in model_rows.values()):
        lines += ["## Model", ""] + _table(model_rows, ("", "")) + [""]
    if gguf:
        lines += ["## Files", ""] + gguf_file_table(gguf_files(facts.folder, lineage)) + [""]

    if lineage is not None:
        lines += ["## Lineage", "",
                  f"Made by **{lineage.operation}**{f' ({lineage.method})' if lineage.method else ''} with "
                  f"{lineage.tool} {lineage.tool_version} on {lineage.created}"
                  + (", from:" if lineage.parents else "."), ""]
        lines += lineage_tree(lineage) + [""]
        if content.local_parents:
            lines += ["Parents that are local folders are listed above by name and weight hashes, and are not "
                      "written as `base_model` ids: " + ", ".join(_code(_shown(p)) for p in content.local_parents)
                      + ".", ""]
        if lineage.outputs:
            lines += ["Output files:", ""] + [f"- {_code(f)} sha256 {_code(d)}"
                                              for f, d in sorted(lineage.outputs.items())]
            lines.append("")
        if lineage.recipe:
            import yaml

            title = "Training configuration" if lineage.operation == "train" else "Recipe"
            shown = without_local_paths(lineage.recipe)
            lines += [f"## {title}", "", "```yaml", yaml.safe_dump(shown, sort_keys=False).rstrip(), "```", ""]
            local = " (local folders are shown by name: put their paths back)" if shown != lineage.recipe else ""
            if lineage.operation == "merge":
                lines += [f"Run it again with `mtool merge recipe.yaml OUTPUT` (or mergekit's `mergekit-yaml`){local}.",
                          ""]
            elif local:
                lines += [f"Run it again with `mtool train CONFIG`{local}.", ""]
        lines += ["## Reproducibility", ""]
        if lineage.seed is not None:
            lines.append(f"Random seed: {_code(lineage.seed)}.")
        elif lineage.operation == "train":
            lines.append("Random seed: not recorded.")
        else:
            lines.append("No random seed: this operation is deterministic.")
        lines.append("")
        if lineage.warnings:
            lines += ["## Warnings", "", f"{lineage.tool} warned while making this model:", ""]
            lines += [f"- {warning}" for warning in lineage.warnings] + [""]
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
        lines += evaluation_section(lineage) + search_section(lineage, facts.folder)
    if (facts.folder / LOSS_PLOT).is_file():
        lines += ["![Training loss](loss.png)", ""]
    lines += ["## Usage", ""] + _usage(content) + [""]
    lines += _license_section(content) + [""]
    if content.gaps:
        lines += ["## Gaps", "", "This card could not document:", ""] + [f"- {gap}" for gap in content.gaps] + [""]
    return "\n".join(lines).rstrip() + "\n"
