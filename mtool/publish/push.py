"""``mtool push FOLDER REPO_ID``: publish a model folder on the Hugging Face Hub, once its card is fit to publish.

Refused, each with the fix, before anything is sent:

* the card (``README.md``) is missing or its metadata does not parse (``huggingface_hub.ModelCard``);
* the repository's name does not follow the naming schema, checked against the folder (``mtool name lint
  --model``), or the id is not a valid Hub id;
* the license is unknown: none declared, ``other`` without ``license_name`` and ``license_link``, an id the Hub
  does not know, or a no-derivatives license that forbids publishing the model at all;
* the card shows local absolute paths (``/home/...``, ``C:\\...``, ``~/...``), which say where files lay on the
  machine that made the model and mean nothing to a reader;
* (for a real upload) no Hugging Face token: it is read the way huggingface_hub reads it (``HF_TOKEN``, then the
  token file ``hf auth login`` writes), and never printed.

The upload is huggingface_hub's own: ``create_repo`` (``exist_ok``: an existing repository keeps its visibility)
then ``upload_folder`` of exactly the listed files (hidden files are never uploaded); the Hub address is
huggingface_hub's setting (``HF_ENDPOINT``). ``--dry-run`` runs every check and prints what would be uploaded and
the card's metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtool.errors import InputError, MtoolError
from mtool.lineage import LINEAGE_FILENAME
from mtool.naming.card import CARD_FILENAME
from mtool.naming.license import KNOWN_LICENSES, NO_DERIVATIVES, normalize_license
from mtool.naming.lint import lint_name

# An absolute path: after a start, a space, a quote, a backtick or a parenthesis; two components at least.
_ABSOLUTE_PATH = re.compile(r"(?:(?<=^)|(?<=[\s`'\"(\[=:]))(?:/|~/)[\w.+@-]+/[\w.+@/-]*|\b[A-Za-z]:\\[\w .\\-]+",
                            re.MULTILINE)


class PushRefused(InputError):
    """The folder is not fit to publish (see the module docstring)."""


@dataclass(frozen=True)
class UploadFile:
    path: str  # relative to the folder, with '/'
    size: int


@dataclass
class PushPlan:
    """What would be uploaded where, with the card's metadata and what the user should know."""

    folder: Path
    repo_id: str
    private: bool
    files: list[UploadFile]
    metadata: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _files(folder: Path) -> list[UploadFile]:
    """Every regular file under ``folder`` but hidden ones (staging leftovers, caches, .git)."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found.append(UploadFile(relative.as_posix(), path.stat().st_size))
    return found


def _card_metadata(folder: Path) -> tuple[dict[str, Any], str]:
    readme = folder / CARD_FILENAME
    if not readme.is_file():
        raise PushRefused("the folder has no model card (README.md)", where=str(folder),
                          fix=f"write one with `mtool card {folder}`")
    from huggingface_hub import ModelCard

    text = readme.read_text(encoding="utf-8", errors="replace")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as error:  # noqa: BLE001 - any parse error of the front matter is the same refusal
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PushRefused(f"the model card's metadata does not parse: {first}", where=str(readme),
                          fix=f"regenerate it with `mtool card {folder} --force`, or repair its YAML front matter")
    metadata = card.data.to_dict()
    if not metadata:
        raise PushRefused("the model card has no metadata (YAML front matter)", where=str(readme),
                          fix=f"regenerate it with `mtool card {folder} --force`")
    return metadata, text


def _check_name(folder: Path, repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushRefused(f"not a valid Hub repository id: {str(error).splitlines()[0]}", where=repo_id,
                          fix="give OWNER/NAME (letters, digits, '-', '_', '.')") from None
    owner, _, name = repo_id.rpartition("/")
    report = lint_name(name, folder)
    if not report.ok:
        error = next(f for f in report.findings if f.severity == "error")
        fix = (f"push as {owner + '/' if owner else ''}{report.suggestion}" if report.suggestion
               else error.fix)
        raise PushRefused(f"the name {name} does not follow the naming schema: {error.message}", where=repo_id,
                          fix=f"{fix} (`mtool name lint {name} --model {folder}` lists every finding)")


def _check_license(folder: Path, metadata: dict[str, Any]) -> None:
    declared = metadata.get("license")
    card_fix = f"run `mtool card {folder} --license ID --force` with the license the model is published under"
    if not declared:
        raise PushRefused("the model card declares no license", where=str(folder / CARD_FILENAME), fix=card_fix)
    key = normalize_license(str(declared))
    if key == "other":
        if not (metadata.get("license_name") and metadata.get("license_link")):
            raise PushRefused("the license is 'other' without license_name and license_link: it is unknown",
                              where=str(folder / CARD_FILENAME),
                              fix=f"{card_fix}, or add license_name and license_link to the card")
        return
    terms = KNOWN_LICENSES.get(str(key))
    if terms is None or terms.hub_other:
        raise PushRefused(f"the license {declared!r} is not a license id the Hub knows",
                          where=str(folder / CARD_FILENAME), fix=card_fix)
    if terms.rank == NO_DERIVATIVES:
        raise PushRefused(f"the license {terms.id} forbids distributing derivatives of the model",
                          where=str(folder / CARD_FILENAME), fix="do not publish this model")


def local_paths(text: str) -> list[str]:
    """The absolute local paths a text shows (module docstring), in order, each once."""
    return list(dict.fromkeys(match.group(0).rstrip(".,;:)`'\"") for match in _ABSOLUTE_PATH.finditer(text)))


def plan_push(folder: str | Path, repo_id: str, *, private: bool = False) -> PushPlan:
    """Check ``folder`` for publishing as ``repo_id`` (module docstring); PushRefused names the first problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("no such folder", where=str(folder), fix="give the model folder to publish")
    metadata, text = _card_metadata(folder)
    _check_name(folder, repo_id)
    _check_license(folder, metadata)
    paths = local_paths(text)
    if paths:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise PushRefused(f"the model card shows local paths ({shown})", where=str(folder / CARD_FILENAME),
                          fix="edit README.md to name those folders without their path (or by Hub id), or make the "
                              "model from inputs named by Hub id or relative path")
    plan = PushPlan(folder, repo_id, private, _files(folder), metadata)
    if "/" in repo_id and repo_id not in text:
        plan.notes.append(f"the card's usage does not name {repo_id}: `mtool card {folder} --repo-id {repo_id} "
                          "--force` updates it")
    lineage = folder / LINEAGE_FILENAME
    if lineage.is_file() and local_paths(lineage.read_text(encoding="utf-8", errors="replace")):
        plan.notes.append(f"{LINEAGE_FILENAME} records the local folders the parents were read from (their path "
                          "fields), as provenance")
    if not any(f.path.endswith((".safetensors", ".gguf")) for f in plan.files):
        plan.notes.append("the folder holds no weights (*.safetensors, *.gguf)")
    return plan


def _hub_error(error: Exception, endpoint: str) -> MtoolError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return MtoolError("huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)",
                          fix="unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE for the upload")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        message = str(error).strip().splitlines()[0]
        fixes = {401: "the token was refused: log in again with `hf auth login` (or set HF_TOKEN)",
                 403: "the token has no write access to this namespace: use a write token or another owner",
                 404: "check the repository id and that the token may write to it"}
        return MtoolError(f"the Hub refused the upload ({status}): {message}",
                          fix=fixes.get(status or 0, "try again; if it persists, check the Hub's status"))
    return MtoolError(f"cannot reach the Hub at {endpoint}: {type(error).__name__}: {error}",
                      fix="check the network (and HF_ENDPOINT)")


def push(plan: PushPlan, *, message: str | None = None) -> str:
    """Create the repository (if needed) and upload the plan's files; returns the commit's URL."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise PushRefused("no Hugging Face token", where="huggingface_hub",
                          fix="log in with `hf auth login` or set HF_TOKEN to a write token")
    api = HfApi()
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=url.repo_id, folder_path=plan.folder, repo_type="model",
                                   allow_patterns=[f.path for f in plan.files],
                                   commit_message=message or f"Upload {plan.folder.name} with mtool")
    except Exception as error:  # noqa: BLE001 - every client error becomes one message without the token
        raise _hub_error(error, api.endpoint) from None
    return str(commit.commit_url)
