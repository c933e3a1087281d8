"""Who the exported model is: the GGUF file names and the ``general.*`` provenance keys.

A model with a standardized name keeps it (``--name``, else the name of its folder or Hub repository when that is a
standardized name that lints clean against it, else the name its lineage record suggests): files are
``<Name>-<TYPE>.gguf`` (``Llama-3.1-8B-Medic-SFT-v1.0-Q8_0.gguf``: the GGUF naming convention's BaseName, SizeLabel,
FineTune, Version and Encoding are the name's Family, Size, ``[BaseVariant-]Label-Method`` and version), and the
keys the GGUF specification defines for provenance are filled from the same record and card:

* ``general.name``, ``basename``, ``size_label``, ``finetune``, ``version``: the name and its parts;
* ``general.license`` (+ ``license.name`` / ``license.link`` for a custom license): the license resolved from the
  parents, as the card publishes it;
* ``general.base_model.count`` and ``general.base_model.<i>.name`` / ``organization`` / ``repo_url``: the model's
  parents (a Hub parent with its organization and URL; a local folder by its name only, never its path);
* ``general.source.url`` / ``source.repo_url``: the Hub repository the weights were converted from, when they
  came from the Hub.

A model without a standardized name (a publisher's base model) gets what llama.cpp's own converter would give it:
gguf-py's ``Metadata.load`` reads its card, config and folder name, and ``naming_convention`` names the files
(``Qwen2.5-7B-Instruct-Q8_0.gguf``). gguf-py writes the keys either way (``Metadata.set_gguf_meta_model``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import gguf

from mtool import ui
from mtool.errors import InputError
from mtool.hub import ModelRef
from mtool.naming.card import build_card
from mtool.naming.check import check_name, parse_name
from mtool.naming.facts import output_name
from mtool.naming.lint import lint_name
from mtool.naming.schema import ModelName

HUB_URL = "https://huggingface.co"


@dataclass(frozen=True)
class ExportIdentity:
    """The file-name stem (``<stem>-<TYPE>.gguf``), the standardized name when there is one, the general.* keys."""

    stem: str
    name: ModelName | None
    metadata: gguf.Metadata

    def filename(self, type_name: str) -> str:
        return f"{self.stem}-{type_name}.gguf"


def _hub_entry(model_id: str) -> dict[str, str]:
    organization, _, name = model_id.partition("/")
    return {"name": name, "organization": organization, "repo_url": f"{HUB_URL}/{model_id}"}


def given_name(given: str, source: Path, *, adapter: bool = False) -> ModelName | None:
    """The standardized name the user gave the model (its folder or Hub name), when it is one and lints clean
    against ``source``; an adapter's name without its ``-LoRA`` (the export is the merged model)."""
    name = check_name(given).model_name()
    if name is None or name.encoding is not None or name.lora != adapter:
        return None
    name = dataclasses.replace(name, lora=False)
    return name if lint_name(name.format(), source).ok else None


def export_identity(source: Path, ref: ModelRef | None, *, name: str | None, parameters: int,
                    given: str | None = None, adapter: bool = False) -> ExportIdentity:
    """The identity of the model in ``source`` (``ref``: how the user named it, when it is that folder): ``name``
    (``--name``), else ``given`` (the folder or Hub name MODEL had) when it is a standardized name of this model,
    else the name its lineage record suggests, else llama.cpp's convention (module docstring)."""
    chosen = None
    if name is not None:
        chosen = parse_name(name)
        if chosen.lora:
            raise InputError("a GGUF export is a full model: its name has no -LoRA", where="--name",
                             fix="drop -LoRA from the name")
        chosen = dataclasses.replace(chosen, encoding=None)
    elif given is not None:
        chosen = given_name(given, source, adapter=adapter)
    content, _ = build_card(source, name=None if chosen is None else chosen.format())
    model_name = content.name
    source_urls = {}
    if ref is not None and ref.is_hub:
        source_urls = {"source_url": f"{HUB_URL}/{ref.id}", "source_repo_url": f"{HUB_URL}/{ref.id}"}
    if model_name is None:
        metadata = gguf.Metadata.load(None, source, ref.id.rpartition("/")[2] if ref and ref.is_hub else None,
                                      parameters)
        metadata.name = metadata.name or output_name(source)
        metadata.size_label = metadata.size_label or gguf.size_label(parameters, parameters, 0, 0)
        for key, value in source_urls.items():
            setattr(metadata, key, getattr(metadata, key) or value)
        stem = gguf.naming_convention(metadata.name, metadata.basename, metadata.finetune, metadata.version,
                                      metadata.size_label, None)
        ui.info(f"{output_name(source)} has no standardized name (no lineage record naming its method): the GGUF "
                f"files follow llama.cpp's naming convention ({stem}-<TYPE>.gguf); pass --name to give one")
        return ExportIdentity(stem, None, metadata)
    resolution = content.license
    base_models = [_hub_entry(model_id) for model_id in content.base_models]
    base_models += [{"name": output_name(Path(parent.path or parent.id))} for parent in content.local_parents]
    metadata = gguf.Metadata(
        name=model_name.format(), basename=model_name.family, size_label=model_name.size,
        finetune=model_name.finetune, version=model_name.version,
        license=resolution.license, license_name=resolution.license_name, license_link=resolution.license_link,
        base_models=base_models or None, **source_urls)
    return ExportIdentity(model_name.format(), model_name, metadata)


def add_general(writer: gguf.GGUFWriter, identity: ExportIdentity, file_type: gguf.LlamaFileType) -> None:
    """``general.*``: type, provenance (module docstring), file type and quantization version."""
    writer.add_type(gguf.GGUFType.MODEL)
    identity.metadata.set_gguf_meta_model(writer)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
