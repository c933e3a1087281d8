"""``mtool push`` against a local Hub (tests/support/hub_server.py) on 127.0.0.1: huggingface_hub's real client, in
a separate ``mtool`` process pointed at it by ``HF_ENDPOINT``, uploads through the Hub's API; every refusal is
checked, and the token never appears in what mtool prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtool.publish.push import local_paths
from tests.support.hub_server import LocalHub
from tests.support.publishable import NAME, licensed_merge

TOKEN = "hf_localTestToken0123456789"
REPO = f"tester/{NAME}-GGUF"


@pytest.fixture(scope="module")
def publishable(tmp_path_factory) -> Path:
    """The GGUF export of a licensed merge, exported from its folder by relative path, carded for REPO."""
    from mtool.export.gguf_export import GGUFExportOptions, export_gguf
    from mtool.naming.card import write_card

    root = tmp_path_factory.mktemp("push")
    licensed_merge(root)
    here = os.getcwd()
    os.chdir(root)
    try:
        export_gguf("merged", Path(f"{NAME}-GGUF"), GGUFExportOptions(types=("q8_0",)))
    finally:
        os.chdir(here)
    folder = root / f"{NAME}-GGUF"
    write_card(folder, repo_id=REPO)
    return folder


def _mtool(*args: str, endpoint: str, home: Path, token: str | None = TOKEN):
    """``mtool ARGS`` in a process of its own, huggingface_hub configured by its environment variables only: the
    local Hub's address, the token, an empty Hugging Face home, and the LFS upload protocol (huggingface_hub's
    ``HF_HUB_DISABLE_XET``: the Hub's Xet storage protocol has no local stand-in)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])))
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "mtool.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_push_uploads_every_file_through_the_hub_api(publishable: Path, tmp_path: Path) -> None:
    with LocalHub(TOKEN) as hub:
        result = _mtool("push", str(publishable), REPO, "--private", endpoint=hub.endpoint, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"{hub.endpoint}/{REPO}/commit/")
    repository = hub.state.repos[REPO]
    assert repository["visibility"] == "private"
    local = {p.name: p.read_bytes() for p in publishable.iterdir()}
    assert repository["files"] == local  # every file, byte for byte; the GGUF through LFS, the rest inline
    calls = [path for _, path in hub.state.requests]
    assert "/api/repos/create" in calls and f"/{REPO}.git/info/lfs/objects/batch" in calls
    assert any(path.startswith("/lfs-upload/") for path in calls) and calls[-1] == f"/api/models/{REPO}/commit/main"
    assert hub.state.commits[0]["header"]["summary"] == f"Upload {publishable.name} with mtool"
    assert TOKEN not in result.stdout + result.stderr


def test_a_name_without_owner_goes_to_the_tokens_namespace(publishable: Path, tmp_path: Path) -> None:
    with LocalHub(TOKEN) as hub:
        result = _mtool("push", str(publishable), f"{NAME}-GGUF", endpoint=hub.endpoint, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert hub.state.repos[REPO]["visibility"] == "public" and len(hub.state.repos[REPO]["files"]) == 4


def test_dry_run_prints_the_files_and_the_card_metadata_and_sends_nothing(publishable: Path, tmp_path: Path) -> None:
    with LocalHub(TOKEN) as hub:
        result = _mtool("push", str(publishable), REPO, "--dry-run", endpoint=hub.endpoint, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert hub.state.requests == []
    size = (publishable / f"{NAME}-Q8_0.gguf").stat().st_size
    assert "would upload 4 files" in result.stdout and f"{size:,}  {NAME}-Q8_0.gguf" in result.stdout
    assert "license: apache-2.0" in result.stdout and "library_name: gguf" in result.stdout
    assert f"model_name: {NAME}-GGUF" in result.stdout


def test_without_a_token_nothing_is_sent(publishable: Path, tmp_path: Path) -> None:
    with LocalHub(TOKEN) as hub:
        result = _mtool("push", str(publishable), REPO, endpoint=hub.endpoint, token=None, home=tmp_path)
    assert result.returncode == 2 and "no Hugging Face token" in result.stderr and "hf auth login" in result.stderr
    assert hub.state.requests == []


def test_a_refused_token_is_reported_without_printing_it(publishable: Path, tmp_path: Path) -> None:
    wrong = "hf_wrongToken9876543210"
    with LocalHub(TOKEN) as hub:
        result = _mtool("push", str(publishable), REPO, endpoint=hub.endpoint, token=wrong, home=tmp_path)
    assert result.returncode == 1 and "the Hub refused the upload (401)" in result.stderr
    assert "hf auth login" in result.stderr and "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr and not hub.state.repos


def _edit_card(folder: Path, edit) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    edit(card)
    card.save(folder / "README.md")


def _set(**values):
    def edit(card) -> None:
        for key, value in values.items():
            setattr(card.data, key, value)

    return edit


REFUSALS = {
    "no card": (lambda folder: (folder / "README.md").unlink(), REPO, "the folder has no model card",
                "mtool card"),
    "card does not parse": (lambda folder: (folder / "README.md").write_text("---\nlicense: [apache-2.0\n---\n# x\n"),
                            REPO, "the model card's metadata does not parse", "--force"),
    "name does not lint": (lambda folder: None, "tester/my-fine-model", "does not follow the naming schema",
                           "push as tester/"),
    "method does not match": (lambda folder: None, f"tester/{NAME.replace('TIES', 'SLERP')}-GGUF",
                              "SLERP but the lineage says TIES", f"push as {REPO}"),
    "invalid repo id": (lambda folder: None, "a/b/c", "not a valid Hub repository id", "OWNER/NAME"),
    "no license": (lambda folder: _edit_card(folder, _set(license=None)), REPO, "declares no license",
                   "--license ID"),
    "unknown other license": (lambda folder: _edit_card(folder, _set(license="other")), REPO,
                              "'other' without license_name and license_link", "--license ID"),
    "license id the Hub does not know": (lambda folder: _edit_card(folder, _set(license="my-own-terms")), REPO,
                                         "is not a license id the Hub knows", "--license ID"),
    "no derivatives": (lambda folder: _edit_card(folder, _set(license="cc-by-nd-4.0")), REPO,
                       "forbids distributing derivatives", "do not publish"),
    "local paths": (lambda folder: (folder / "README.md").write_text(
        (folder / "README.md").read_text() + "\nMerged from `/home/alice/models/base` on C:\\Users\\alice.\n"),
        REPO, "the model card shows local paths (/home/alice/models/base, C:\\Users\\alice", "Hub id"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_every_refusal_says_why_and_what_to_do_and_sends_nothing(publishable: Path, tmp_path: Path, case: str,
                                                                 run_cli) -> None:
    edit, repo_id, message, fix = REFUSALS[case]
    folder = tmp_path / publishable.name
    shutil.copytree(publishable, folder)
    edit(folder)
    for dry_run in ((), ("--dry-run",)):
        result = run_cli("push", folder, repo_id, *dry_run, expect=2)
        assert message in result.output and fix in result.output, result.output
        assert "Traceback" not in result.output and "would upload" not in result.output


def test_local_paths_are_found_and_urls_are_not() -> None:
    text = ("See https://huggingface.co/org/name and [link](https://www.apache.org/licenses/LICENSE-2.0); "
            "1/sqrt(d), and/or W·B/A, ./Model-Q8_0.gguf, `acme/Tiny-1B`. Made from /work/runs/base and "
            "(~/models/ft) and D:\\data\\set.\nbase_model: /tmp/x/y")
    assert local_paths(text) == ["/work/runs/base", "~/models/ft", "D:\\data\\set", "/tmp/x/y"]
