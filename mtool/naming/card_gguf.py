"""The parts of a model card that are particular to a folder of GGUF files (``mtool export gguf``'s output).

The files are listed with their type, size and sha256 (from the lineage record), and the usage section says how
to run them: llama.cpp (``llama-cli`` / ``llama-server``, from the file or straight from the Hub), Ollama (from
the Hub, or the ``Modelfile`` the export wrote beside the files, whose ``TEMPLATE`` is the model's chat template
written as Ollama's Go template, :mod:`mtool.modelfile`) and LM Studio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtool.lineage import Lineage
from mtool.modelfile import MODELFILE, modelfile

GGUF_TAGS = ("gguf", "llama.cpp")


@dataclass(frozen=True)
class GGUFFile:
    name: str
    type: str
    size: int
    sha256: str | None


def is_gguf_folder(folder: Path, lineage: Lineage | None) -> bool:
    """A folder of GGUF files: made by ``mtool export gguf``, or holding ``*.gguf`` files."""
    if lineage is not None and lineage.operation == "export":
        return lineage.method == "gguf"
    return any(folder.glob("*.gguf"))


def gguf_files(folder: Path, lineage: Lineage | None) -> list[GGUFFile]:
    """The GGUF files of ``folder``, with the types and digests the record gives."""
    types = dict((lineage.parameters.get("files") or {}) if lineage is not None else {})
    digests = dict(lineage.outputs) if lineage is not None else {}
    return [GGUFFile(file.name, str(types.get(file.name, "")), file.stat().st_size, digests.get(file.name))
            for file in sorted(folder.glob("*.gguf"))]


def _first_shard_files(files: list[GGUFFile]) -> list[GGUFFile]:
    """One entry per model file: a split file is named by its first shard."""
    return [f for f in files if "-of-" not in f.name or "-00001-of-" in f.name]


def gguf_usage(folder: Path, files: list[GGUFFile], repo_id: str) -> list[str]:
    """The usage section's lines for a GGUF folder (module docstring)."""
    runnable = _first_shard_files(files)
    if not runnable:
        return ["This folder holds no GGUF file."]
    written = folder / MODELFILE
    text = written.read_text(encoding="utf-8") if written.is_file() else modelfile(runnable[0].name, None)
    model_file = text.splitlines()[0].removeprefix("FROM ./")
    chosen = next((f for f in runnable if f.name == model_file), runnable[0])
    quant = f":{chosen.type}" if chosen.type else ""
    on_hub = "/" in repo_id  # an owner/name id: the files can be run straight from the Hub
    lines = ["With [llama.cpp](https://github.com/ggml-org/llama.cpp) (chat with the template stored in the file):",
             "", "```bash", f"llama-cli -m {chosen.name} -cnv", f"llama-server -m {chosen.name} --port 8080"]
    lines += [f"llama-cli -hf {repo_id}{quant} -cnv   # straight from the Hub"] if on_hub else []
    lines += ["```", "", "With [Ollama](https://ollama.com):", ""]
    lines += ["```bash", f"ollama run hf.co/{repo_id}{quant}", "```", "", "or from the downloaded file, with"] \
        if on_hub else ["From the file, with"]
    lines[-1] += " the folder's `Modelfile` (`ollama create NAME -f Modelfile`):"
    lines += ["", "```", text.rstrip(), "```", ""]
    if "TEMPLATE" not in text:
        lines += ["It has no `TEMPLATE`: the model has no chat template, or one that Ollama's template language cannot "
                  "write line for line (Ollama then uses the template stored in the GGUF file when it recognizes "
                  "it).", ""]
    lines += ["In [LM Studio](https://lmstudio.ai), search for the repository and pick a file." if on_hub else
              "In [LM Studio](https://lmstudio.ai), import the file (`lms import FILE`)."]
    if not on_hub:
        lines += ["", "Run from the Hub once published: `mtool card FOLDER --repo-id OWNER/NAME --force` adds the "
                  "commands for the repository to this section."]
    return lines


def gguf_file_table(files: list[GGUFFile]) -> list[str]:
    lines = ["| File | Type | Size | sha256 |", "| --- | --- | ---: | --- |"]
    for f in files:
        lines.append(f"| `{f.name}` | {f.type or '?'} | {f.size / 1e6:,.1f} MB | `{f.sha256 or 'not recorded'}` |")
    return lines
