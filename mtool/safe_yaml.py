"""YAML as mtool reads it (merge recipes, training configs, ``--set`` values, model card front matter).

PyYAML's safe constructor (plain data only: no Python objects, no code), with the document composed in Python
under limits, so that no file can make a load slow, deep or huge (the events come from libyaml when PyYAML has it,
7x faster than its pure-Python parser, which is used otherwise):

- the text is read in UTF-8 (a byte that is not refuses the file, with its line) and at most ``MAX_BYTES`` of it
  (recipes and configs are a few kilobytes; the largest per-layer recipes stay under 50 KB);
- nesting is at most ``MAX_DEPTH`` levels (``[[[[...`` cannot exhaust the stack);
- the document expands to at most ``MAX_NODES`` nodes, an alias counting as every node it stands for: anchors and
  aliases work as YAML says, but an "alias bomb" (aliases of aliases, 2 KB that expand to gigabytes) is refused
  at the alias that crosses the limit, and an alias inside the node it names (a recursive structure) is refused;
- a scalar holds at most ``MAX_SCALAR_CHARS`` characters;
- a key given twice in one mapping is refused (PyYAML keeps the last one silently), naming both lines; merge keys
  (``<<: *defaults``) still let a mapping override what it merges.

Every refusal is a :class:`~mtool.errors.ConfigError` whose ``where`` is ``"<source>, line N"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from mtool.errors import ConfigError, printable, shown
from mtool.io.text import read_utf8

MAX_BYTES = 256 * 1024
MAX_DEPTH = 64
MAX_NODES = 20_000
MAX_SCALAR_CHARS = 64 * 1024
_MERGE_TAG = "tag:yaml.org,2002:merge"

try:
    from yaml.cyaml import CParser as _EventParser
except ImportError:  # PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _EventParser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _Refusal(Exception):
    """A limit or rule broken at ``mark`` (converted to a ConfigError with the source's name)."""

    def __init__(self, what: str, mark: yaml.Mark | None, fix: str | None = None) -> None:
        super().__init__(what)
        self.what, self.mark, self.fix = what, mark, fix


class _BoundedLoader(Composer, SafeConstructor, Resolver, _EventParser):
    """Events from the parser; composed (Python's :class:`Composer`, first in the method order), counted, bounded
    and checked here; constructed by the safe constructor (module docstring)."""

    def __init__(self, text: str) -> None:
        _EventParser.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._expanded = 0  # nodes of the document so far, every alias counted as the nodes it stands for
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for; set once the node is complete

    def _count(self, nodes: int, mark: yaml.Mark, alias: bool) -> None:
        self._expanded += nodes
        if self._expanded > MAX_NODES:
            what = (f"this alias expands the document beyond {MAX_NODES:,} values" if alias
                    else f"the document holds more than {MAX_NODES:,} values")
            raise _Refusal(what, mark, "write the values out, or split the file")

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self._sizes.get(id(target))
                if size is None:
                    raise _Refusal(f"the alias *{shown(event.anchor, 40)} lies inside the node it refers to (a "
                                   "recursive structure)", event.start_mark, "remove the alias")
                self._count(size, event.start_mark, alias=True)
            return super().compose_node(parent, index)
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR_CHARS:
            raise _Refusal(f"a value of {len(event.value):,} characters (at most {MAX_SCALAR_CHARS:,})",
                           event.start_mark, "shorten it (a long text can live in a file the recipe names)")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refusal(f"values nested more than {MAX_DEPTH} levels deep", event.start_mark,
                           "flatten the structure")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        else:
            children = []
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
        self._count(1, event.start_mark, alias=False)
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_line.get(key)
                except TypeError:
                    continue  # an unhashable key: the safe constructor refuses it with its own message
                line = key_node.start_mark.line + 1
                if earlier is not None:
                    raise _Refusal(f"the key {shown(key, 60)} is given twice (first on line {earlier}); YAML keeps "
                                   "only one of them", key_node.start_mark, "remove one of the two")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            value = super().construct_object(node, deep=deep)
            if isinstance(value, str) and not value.isascii():
                value.encode("utf-8")  # a "\ud800" escape (libyaml refuses it; PyYAML's own parser does not)
            return value
        except UnicodeEncodeError:
            raise _Refusal("a string with a lone surrogate escape is not Unicode", node.start_mark,
                           "remove the escape") from None
        except (ValueError, OverflowError):  # e.g. an integer of 10,000 digits, a timestamp on day 45
            kind = node.tag.rpartition(":")[2]
            raise _Refusal(f"cannot read the value {shown(getattr(node, 'value', ''), 60)} as {kind}",
                           node.start_mark, "quote it to keep it as text, or correct it") from None


@dataclass(frozen=True)
class YamlDocument:
    """A loaded document: the plain data and the composed node tree (for the line of a key)."""

    data: Any
    node: yaml.Node | None


def _where(source: str, mark: yaml.Mark | None) -> str:
    return f"{source}, line {mark.line + 1}" if mark is not None else source


def load_yaml(text: str, *, source: str) -> YamlDocument:
    """Parse one YAML document within the limits (module docstring); ``source`` names it in errors."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"the YAML text is {len(text):,} characters long (at most {MAX_BYTES:,})", where=source,
                          fix="shorten it")
    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _Refusal as refusal:
        raise ConfigError(refusal.what, where=_where(source, refusal.mark), fix=refusal.fix) from None
    except yaml.constructor.ConstructorError as error:  # a tag of Python objects, an unhashable key...
        problem = printable(str(error.problem or "cannot build this value"))[:200]
        raise ConfigError(f"YAML value not allowed: {problem}", where=_where(source, error.problem_mark),
                          fix="write plain data (mappings, lists, strings, numbers); tags of objects are refused") \
            from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = printable(" ".join(part for part in (error.context, error.problem) if part) or "malformed")[:200]
        raise ConfigError(f"malformed YAML: {problem}", where=_where(source, mark),
                          fix="check the indentation, quotes and brackets there") from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, max(0, error.position)) + 1
        code = ord(error.character) if isinstance(error.character, str) else int(error.character)
        raise ConfigError(f"malformed YAML: the character U+{code:04X} is not allowed in YAML text",
                          where=f"{source}, line {line}", fix="remove it or write it as an escape in quotes") \
            from None
    except yaml.YAMLError as error:
        raise ConfigError(f"malformed YAML: {printable(str(error))[:200]}", where=source) from None
    except RecursionError:
        raise ConfigError("the YAML text is nested too deeply", where=source, fix="flatten the structure") from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlDocument(data, node)


def line_of(node: yaml.Node | None, location: tuple) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (a key's own line for a key), or of its
    nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in location:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
            match, marked = (pair[1], pair[0]) if pair else (None, None)  # a key's line is where the key is
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = marked = node.value[key]
        else:
            match = marked = None
        if match is None:
            break
        node = match
        line = marked.start_mark.line + 1
    return line


def read_text(path: str | os.PathLike, *, what: str, max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of a file of at most ``max_bytes`` bytes (read no further: ``/dev/zero`` is refused too)."""
    return read_utf8(path, what=what, max_bytes=max_bytes, fix=f"a {what} is a short text file: check the path",
                     error=ConfigError)


def load_yaml_file(path: str | os.PathLike, *, what: str) -> YamlDocument:
    """:func:`read_text`, then :func:`load_yaml` with the file's path as the source."""
    return load_yaml(read_text(path, what=what), source=str(path))


def markdown_front_matter(text: str, *, source: str) -> dict[str, Any]:
    """The YAML front matter (between ``---`` lines at the top) of a Markdown text such as a model card; an empty
    mapping when there is none or it cannot be read (a card's metadata is optional)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = load_yaml(text[3:end], source=source).data
    except ConfigError:
        return {}
    return data if isinstance(data, dict) else {}
