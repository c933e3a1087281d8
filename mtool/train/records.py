"""Data files checked record by record, so that a bad record is reported with its file and 1-based line.

Before the ``datasets`` library reads them, JSON and JSON Lines files are scanned: every line must be UTF-8, every
record valid JSON and an object (``datasets`` would turn a JSON array of numbers or strings into a ``text``
column and train on it); CSV files must be UTF-8. A ``.json`` file is read as datasets reads it: an array of
records (``[{...}, {...}]``), one object (one record), or JSON Lines. The first problem is an
:class:`~mtool.errors.InputError` whose ``where`` is ``"<file>, line N"``.

Later, when a record's fields do not have the types of the data format (``text`` a number, a message's
``content`` a list), rendering raises :class:`RecordError` with the record's position, and :func:`locate` turns it
into the file and line of that record.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mtool.errors import InputError, kind_of, shown
from mtool.io.jsonfiles import JsonRefusal, check_strings, decoder, loads
from mtool.io.text import decode_utf8

FIX = "correct or remove that record"


class RecordError(InputError):
    """A record whose fields do not fit the data format; ``index`` is its 0-based position in the data."""

    def __init__(self, problem: str, *, index: int, where: str) -> None:
        super().__init__(problem, where=f"{where}, record {index + 1}", fix=FIX)
        self.problem = problem
        self.index = index


def _decode(raw: bytes, path: Path, line: int) -> str:
    """Line ``line`` of ``path`` (``raw``) as UTF-8 text."""
    return decode_utf8(raw, what="data", where=str(path), first_line=line)


def _record(value: Any, path: Path, line: int) -> Any:
    if not isinstance(value, dict):
        raise InputError(f"a data record must be a JSON object with the fields of the data format, not "
                         f"{kind_of(value)} ({shown(value, 60)})", where=f"{path}, line {line}", fix=FIX)
    return value


def _parse(text: str, path: Path, line: int) -> Any:
    try:
        return loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"the record is not valid JSON: {error.msg.lower()}",
                         where=f"{path}, line {line + error.lineno - 1}", fix=FIX) from None
    except JsonRefusal as refusal:
        raise InputError(f"the record is not valid JSON: {refusal.what}", where=f"{path}, line {line}", fix=FIX) \
            from None
    except (ValueError, RecursionError):
        raise InputError("the record is not JSON mtool can read (a huge number or deep nesting)",
                         where=f"{path}, line {line}", fix=FIX) from None


def json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, record)`` for every record of a JSON or JSON Lines file, in the order ``datasets`` reads them."""
    with open(path, "rb") as handle:
        head = handle.read(64 * 1024).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        yield from _array_records(path)
        return
    first: tuple[int, str] | None = None
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = _decode(raw, path, number).rstrip("\r\n")  # a line's error is on that line
            if not text.strip():
                continue
            if first is None:
                first = (number, text)
                try:
                    value = loads(text)
                except (ValueError, RecursionError):
                    if path.suffix.lower() == ".json":  # not JSON Lines: one (pretty-printed) object
                        yield first[0], _record(_parse(_decode(path.read_bytes(), path, 1), path, 1), path, 1)
                        return
                    value = _parse(text, path, number)
                yield number, _record(value, path, number)
                continue
            yield number, _record(_parse(text, path, number), path, number)


def _array_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _decode_whole(path)
    parser = decoder()
    position = text.index("[") + 1
    line_of = _LineCounter(text)
    while True:
        position = _skip_space(text, position)
        if position < len(text) and text[position] == "]":
            rest = _skip_space(text, position + 1)
            if rest < len(text):
                raise InputError("text after the end of the JSON array", where=f"{path}, line {line_of(rest)}",
                                 fix="keep one array of records in the file")
            return
        line = line_of(position)
        try:
            value, position = parser.raw_decode(text, position)
            check_strings(value)
        except json.JSONDecodeError as error:
            raise InputError(f"the data is not valid JSON: {error.msg.lower()}", where=f"{path}, line "
                             f"{error.lineno}", fix=FIX) from None
        except JsonRefusal as refusal:
            raise InputError(f"the record is not valid JSON: {refusal.what}", where=f"{path}, line {line}",
                             fix=FIX) from None
        except (ValueError, RecursionError):
            raise InputError("the record is not JSON mtool can read (a huge number or deep nesting)",
                             where=f"{path}, line {line}", fix=FIX) from None
        yield line, _record(value, path, line)
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            raise InputError("the JSON array is not closed or lacks a comma", where=f"{path}, line "
                             f"{line_of(min(position, len(text)))}", fix="check the file's brackets and commas")


def _decode_whole(path: Path) -> str:
    return decode_utf8(path.read_bytes(), what="data", where=str(path))


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


class _LineCounter:
    """1-based line of a character position, counted incrementally (positions only grow)."""

    def __init__(self, text: str) -> None:
        self.text, self.position, self.line = text, 0, 1

    def __call__(self, position: int) -> int:
        self.line += self.text.count("\n", self.position, position)
        self.position = position
        return self.line


def csv_records(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """``(first line, record)`` for every row of a CSV file with a header row (UTF-8 checked line by line)."""
    with open(path, "rb") as handle:
        lines = [_decode(raw, path, number) for number, raw in enumerate(handle, start=1)]
    reader = csv.DictReader(io.StringIO("".join(lines)))
    start = 2
    for row in reader:
        yield start, row
        start = reader.line_num + 1


def records_of(files: Sequence[Path], builder: str | None) -> Iterator[tuple[Path, int, Any]]:
    """``(file, line, record)`` of every record of loose JSON/JSON Lines/CSV files, in ``datasets``' order."""
    for path in files:
        if builder == "json":
            for line, record in json_records(path):
                yield path, line, record
        elif builder == "csv":
            for line, record in csv_records(path):
                yield path, line, record


def check_files(files: Sequence[Path], builder: str | None) -> None:
    """Scan loose JSON, JSON Lines and CSV files (module docstring); raises at the first bad line, or for a file
    that holds no record."""
    if builder not in ("json", "csv"):
        return
    counts = dict.fromkeys(files, 0)
    for path, _, _ in records_of(files, builder):
        counts[path] += 1
    empty = next((path for path, count in counts.items() if count == 0), None)
    if empty is not None:
        raise InputError("the data file holds no records", where=str(empty),
                         fix="give a file with one record per line (JSON Lines), a JSON array, or a CSV with a "
                             "header row and rows")


def locate(error: RecordError, files: Sequence[Path], builder: str | None) -> InputError:
    """``error`` with the file and line of its record, when the files are ones whose lines can be told."""
    for position, (path, line, _) in enumerate(records_of(files, builder)):
        if position == error.index:
            return InputError(error.problem, where=f"{path}, line {line}", fix=FIX)
    return error
