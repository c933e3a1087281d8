"""The last step of every command that writes a model or adapter folder: its lineage record, then its card.

Commands call :func:`finish_output` on the staging folder of :func:`mtool.io.folders.atomic_output_dir`, once
every weight file is written; the card (``README.md``) is derived from the record just written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mtool.io.hashing import FileHasher
from mtool.lineage import Lineage, write_lineage
from mtool.naming.card import write_card

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.gguf")


def finish_output(folder: Path, record: Lineage, *, hasher: FileHasher, digests: Mapping[str, str] | None = None,
                  card: bool = True) -> Lineage:
    """Record the sha256 of every weight file of ``folder`` (safetensors, GGUF) in ``record`` (``digests`` holds
    those already computed while writing; the others are read), write the record, then the card unless ``card``
    is false."""
    known = digests or {}
    files = sorted(file for pattern in WEIGHT_FILE_PATTERNS for file in Path(folder).glob(pattern))
    record.outputs = {file.name: known.get(file.name) or hasher.sha256(file) for file in files}
    write_lineage(folder, record)
    if card:
        write_card(folder)
    return record
