"""Training data: local files or a saved ``datasets`` folder -> token ids and labels, with statistics.

Loading goes through the ``datasets`` library (JSON Lines, JSON, Parquet, CSV files, a folder of them, or a
folder written by ``Dataset.save_to_disk``), so large sets are memory-mapped Arrow tables, not Python lists.
Each record is rendered (:mod:`mtool.train.formats`) and tokenized once with character offsets; a token is
trained when it starts inside a trained span. ``labels`` hold the token id where the loss is computed and
-100 elsewhere; they are built from the spans, never from the pad id, so an end-of-sequence token that
doubles as the pad token is still learned.

The end-of-sequence token is appended after the text (unless the chat template already wrote it in the last
turn) and trained when the text ends with a trained span (even an empty response teaches the model to stop).
Sequences longer than ``seq_len`` are cut at ``seq_len`` (counted in :class:`DataStats`); an example left with
no trained token after the cut cannot teach anything: it is dropped and counted, and a warning says how many.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.errors import InputError, printable
from mtool.io.hashing import FileHasher
from mtool.train.formats import ChatRenderer, Rendered, render_record
from mtool.train.records import check_files

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class DataSource:
    """What ``data.path`` names: loose files (read with one ``datasets`` builder) or saved dataset folders."""

    builder: str | None  # "json" / "parquet" / "csv"; None for saved folders
    files: tuple[Path, ...]  # every file read, for hashing
    saved_folders: tuple[Path, ...] = ()

    def sha256(self, hasher: FileHasher) -> str:
        """sha256 of one file, or of the lines ``<sha256>  <name>`` of several (in order)."""
        digests = [(hasher.sha256(f), f.name) for f in self.files]
        if len(digests) == 1:
            return digests[0][0]
        return hashlib.sha256("".join(f"{d}  {n}\n" for d, n in digests).encode()).hexdigest()


def find_data(paths: Sequence[str], *, key: str = "data.path") -> DataSource:
    """Resolve ``data.path`` entries to files or saved dataset folders; refuse mixtures and unknown types."""
    files: list[Path] = []
    saved: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if not path.exists():
            raise InputError("data not found", where=f"{key}: {entry}",
                             fix="give local files or a folder (download Hub data sets first, e.g. with `hf download "
                                 "--repo-type dataset`)")
        if path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS):
            saved.append(path)
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)
            if not found:
                raise InputError("the folder holds no .jsonl/.json/.parquet/.csv file and is not a saved data set",
                                 where=f"{key}: {entry}")
            files.extend(found)
        elif path.suffix.lower() in BUILDERS:
            files.append(path)
        else:
            raise InputError(f"unsupported data file type {path.suffix or '(none)'}", where=f"{key}: {entry}",
                             fix="use .jsonl, .json, .parquet or .csv files, or a datasets save_to_disk folder")
    if saved:
        if len(files) != sum(1 for f in files if any(f.is_relative_to(s) for s in saved)):
            raise InputError("cannot mix saved data set folders with loose files", where=key)
        return DataSource(None, tuple(files), tuple(saved))
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise InputError(f"the data files mix formats ({', '.join(sorted(builders))})", where=key,
                         fix="convert them to one format")
    return DataSource(builders.pop(), tuple(files))


def load_records(source: DataSource, *, split: str = "train", key: str = "data.path") -> "datasets.Dataset":
    """The raw records of ``source`` as one ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    if source.saved_folders:
        parts = [_load_saved(folder, split) for folder in source.saved_folders]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    check_files(source.files, source.builder)  # every record an object, UTF-8: else the file and line
    try:
        return datasets.load_dataset(source.builder, data_files=[str(f) for f in source.files], split="train")
    except Exception as error:  # noqa: BLE001 - the builders raise many types for malformed files
        cause = error.__cause__ or error
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise InputError(f"the datasets library cannot read the data ({type(cause).__name__}): "
                         f"{printable(first)[:200]}", where=f"{key}: {', '.join(str(f) for f in source.files)}",
                         fix="check that every record has the same fields with the same types") from None


def _load_saved(folder: Path, split: str) -> "datasets.Dataset":
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"the saved data set has no split {split!r} (it has {', '.join(loaded)})",
                             where=str(folder), fix="set data.split")
        return loaded[split]
    return loaded


# ---------------------------------------------------------------------------------------------------
# Tokenization


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    cut: int  # tokens lost to truncation

    @property
    def trained(self) -> int:
        """Positions whose next token is trained (label shifted by one, as the loss reads it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def trained_mask(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token ``(start, end)``: does it start inside a span? Zero-width (added special) tokens do not."""
    mask = []
    span_index = 0
    for start, end in offsets:
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
        mask.append(inside and end > start)
    return mask


def tokenize_rendered(tokenizer: Any, rendered: Rendered, seq_len: int) -> TokenizedExample:
    """Token ids and labels of one example: trained tokens keep their id, the rest -100; EOS appended; cut."""
    bos = tokenizer.bos_token
    add_special = not (bos and rendered.text.startswith(bos))  # the template wrote BOS already: do not double it
    encoding = tokenizer(rendered.text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    mask = trained_mask(encoding["offset_mapping"], rendered.spans)
    labels = [token if trained else IGNORE_INDEX for token, trained in zip(ids, mask)]
    if rendered.append_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ends_trained = bool(rendered.spans) and rendered.spans[-1][1] >= len(rendered.text)  # (even if empty)
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if ends_trained else IGNORE_INDEX)
    cut = max(0, len(ids) - seq_len)
    return TokenizedExample(ids[:seq_len], labels[:seq_len], cut)


def _tokenize_record(record: Mapping[str, Any], index: int, *, tokenizer: Any, data_format: str, template: str | None,
                     seq_len: int, train_on_prompt: bool, where: str) -> dict[str, Any]:
    renderer = ChatRenderer(tokenizer, template)
    rendered = render_record(record, data_format, renderer, train_on_prompt=train_on_prompt, where=where, index=index)
    example = tokenize_rendered(tokenizer, rendered, seq_len)
    return {"input_ids": example.input_ids, "labels": example.labels, "length": len(example.input_ids),
            "trained": example.trained, "cut": example.cut}


@dataclass(frozen=True)
class DataStats:
    examples: int  # records read
    kept: int  # with at least one trained token
    dropped: int  # no trained token left (empty response, or cut away by truncation)
    truncated: int  # examples longer than seq_len
    tokens: int  # tokens kept
    trained_tokens: int
    tokens_cut: int

    def describe(self, seq_len: int) -> str:
        text = f"{self.kept} examples, {self.tokens} tokens ({self.trained_tokens} trained)"
        if self.truncated:
            share = self.tokens_cut / max(1, self.tokens + self.tokens_cut)
            text += f"; {self.truncated} truncated to {seq_len} tokens ({self.tokens_cut} tokens, {share:.1%}, cut)"
        return text


@dataclass
class TokenizedData:
    """Tokenized examples (Arrow-backed: columns input_ids, labels, length, trained) and their statistics."""

    dataset: "datasets.Dataset"
    stats: DataStats

    def __len__(self) -> int:
        return len(self.dataset)


def tokenize_dataset(records: "datasets.Dataset", tokenizer: Any, *, data_format: str, template: str | None,
                     seq_len: int, train_on_prompt: bool, fingerprint: str, where: str) -> TokenizedData:
    """Render and tokenize every record; drop (and count) the examples with nothing to train on."""
    import numpy as np

    tokenized = records.map(
        _tokenize_record, with_indices=True, remove_columns=records.column_names, new_fingerprint=fingerprint,
        fn_kwargs=dict(tokenizer=tokenizer, data_format=data_format, template=template, seq_len=seq_len,
                       train_on_prompt=train_on_prompt, where=where),
    )
    columns = tokenized.select_columns(["length", "trained", "cut"]).with_format("numpy")[:]
    trained, cut, length = columns["trained"], columns["cut"], columns["length"]
    keep = np.flatnonzero(trained > 0)
    stats = DataStats(examples=len(tokenized), kept=int(keep.size), dropped=int(len(tokenized) - keep.size),
                      truncated=int((cut > 0).sum()), tokens=int(length[keep].sum()),
                      trained_tokens=int(trained[keep].sum()), tokens_cut=int(cut.sum()))
    if keep.size < len(tokenized):
        tokenized = tokenized.select(keep)
    return TokenizedData(tokenized.select_columns(["input_ids", "labels", "length", "trained"]), stats)


def split_for_eval(data: TokenizedData, fraction: float, seed: int) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """A seeded random ``fraction`` of the examples (at least one) held out for evaluation."""
    import numpy as np

    count = len(data.dataset)
    held = max(1, round(fraction * count))
    if held >= count:
        raise InputError(f"data.eval_fraction {fraction} leaves no training example ({count} examples)",
                         where="data.eval_fraction", fix="lower it or give more data")
    order = np.random.default_rng(seed).permutation(count)
    return data.dataset.select(np.sort(order[held:])), data.dataset.select(np.sort(order[:held]))


def data_fingerprint(*parts: Any) -> str:
    """A short stable id of everything that determines the tokenized data (for the ``datasets`` cache)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:32]
