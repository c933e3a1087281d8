"""What makes a model card publishable as written, and the small rewrites that make it so.

A card goes to the Hub for everyone to read: it must parse (front matter the Hub's client reads), name local
folders by their name and weight hashes rather than by a path on the machine that made them, show numbers rounded
for people, and have no empty sections. :func:`card_problems` checks a card's text (``mtool card --check``);
:func:`display_reference`, :func:`without_local_paths` and :func:`for_people` are what the card writer uses.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePath
from typing import Any

SIGNIFICANT_DIGITS = 4
# An absolute local path: /a/b, ~/a, C:\a (a URL's slashes are preceded by ':' or '/', never matched).
_LOCAL_PATH = re.compile(r"(?<![\w:/.\-~])(?:/[\w.\-]+(?:/[\w.\-]*)+|~/[\w.\-/]+|[A-Za-z]:\\[\w.\-\\]+)")
_LONG_DECIMAL = re.compile(r"(?<![\w.])-?\d+\.(\d+)(?:e[-+]?\d+)?(?![\w.])")
_HEADING = re.compile(r"^(#{1,6})\s")
_MAX_SHOWN_DIGITS = 6


def looks_local(reference: str) -> bool:
    """Whether ``reference`` is a path on this machine (absolute, home-relative or with a drive letter)."""
    return bool(_LOCAL_PATH.fullmatch(reference)) or reference.startswith(("/", "~", "./", "../"))


def display_reference(reference: str, *, is_hub: bool = False) -> str:
    """A Hub id as it is; a local path by its last part (``/tmp/x/Llama-8B-Medic`` -> ``Llama-8B-Medic``)."""
    if is_hub or not looks_local(reference):
        return reference
    return PurePath(reference.replace("\\", "/")).name or reference


def without_local_paths(value: Any) -> Any:
    """``value`` (a recipe or config: dicts, lists, strings) with every local path replaced by its last part."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str):
        return _LOCAL_PATH.sub(lambda match: display_reference(match.group(0)), value)
    return value


def for_people(value: Any) -> Any:
    """Floats rounded to four significant digits (in dicts and lists too); everything else as it is."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {key: for_people(item) for key, item in value.items()}
    if isinstance(value, list):
        return [for_people(item) for item in value]
    return value


def _dangling(lines: list[str]) -> list[str]:
    """Headings with nothing under them before the next heading of the same or a higher level, and list items
    that announce a list (ending in ':') with nothing nested under them."""
    found = []
    for index, line in enumerate(lines):
        heading = _HEADING.match(line)
        following = next((other for other in lines[index + 1:] if other.strip()), None)
        if heading:
            level = len(heading.group(1))
            next_heading = _HEADING.match(following) if following is not None else None
            if following is None or (next_heading and len(next_heading.group(1)) <= level):
                found.append(f"the section {line.strip()!r} is empty")
        elif line.lstrip().startswith("- ") and line.rstrip().endswith(":"):
            indent = len(line) - len(line.lstrip())
            if following is None or len(following) - len(following.lstrip()) <= indent:
                found.append(f"{line.strip()!r} announces a list with nothing under it")
        elif line.rstrip().endswith(":") and (following is None or _HEADING.match(following)):
            found.append(f"{line.strip()!r} announces something that does not follow")
    return found


def card_problems(text: str) -> list[str]:
    """What keeps a card's text from being published as written (empty: nothing)."""
    from huggingface_hub import ModelCard

    problems = []
    try:
        card = ModelCard(text)
    except Exception as error:  # noqa: BLE001 - any failure to read it is the finding
        return [f"the card does not parse: {str(error).splitlines()[0]}"]
    if not text.startswith("---") or not card.data.to_dict():
        problems.append("the card has no metadata (YAML front matter between --- lines)")
    for match in sorted({m.group(0) for m in _LOCAL_PATH.finditer(text)}):
        problems.append(f"a local path {match!r}: name the folder instead (its weight hashes identify it)")
    for match in _LONG_DECIMAL.finditer(text):
        digits = len(match.group(0).lstrip("-").split("e")[0].replace(".", "").lstrip("0"))
        if digits > _MAX_SHOWN_DIGITS:
            problems.append(f"an unrounded number {match.group(0)}: round it for people")
    body = text.split("\n---", 1)[1] if text.startswith("---") and "\n---" in text else text
    problems += _dangling(body.splitlines())
    return problems
