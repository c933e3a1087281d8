"""The naming schema: ``<Family>-<Size>[-<BaseVariant>]-<Label>-<Method>-v<Major>.<Minor>[-LoRA][-<Encoding>]``.

Parts are separated by ``-``; a part is ASCII letters and digits, with ``.`` only between two digits.

- Family: the lineage root's family as its publisher spells it, release version included
  (``Llama-3.1``, ``Mistral-v0.1``, ``Qwen2.5``, ``gemma-2``); it may span several ``-`` parts.
- Size: the parameter count, two significant digits and a unit (``8.0B``, ``494M``, ``8x7.2B``).
- BaseVariant (optional): the base's variant (``Instruct``, ``it``, ``Chat``).
- Label: what this artifact is (``Medic``, ``MythoKimiko``), one part.
- Method: one of the closed list in :mod:`mtool.naming.methods`.
- Version: this artifact's ``v<Major>.<Minor>``.
- ``LoRA`` when the artifact is an adapter; an encoding part (``GGUF``, ``Q4_K_M``, ``AWQ``) when it is a
  quantized/converted copy. In a GGUF *file* name llama.cpp writes the encoding before the type
  (``...-v1.0-F16-LoRA``); both orders parse.

The order is the GGUF file-naming convention's (BaseName, SizeLabel, FineTune, Version, Encoding, Type), so
``basename = Family``, ``size_label = Size``, ``finetune = [BaseVariant-]Label-Method`` and ``version``
rebuild the name with llama.cpp's converter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mtool.naming.methods import Relation, canonical_method, find_method, relation_of
from mtool.naming.rules import Finding, has_errors

NAME_MAX_LENGTH = 96
LORA = "LoRA"

_HUB_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_WORD = re.compile(r"[A-Za-z0-9]+(?:\.[0-9][A-Za-z0-9]*)*")
_VERSION = re.compile(r"v(?P<major>0|[1-9][0-9]*)\.(?P<minor>0|[1-9][0-9]*)")
_VERSION_LIKE = re.compile(r"(?:[vV](?P<a>[0-9]+(?:\.[0-9]+)*))|(?P<b>[0-9]+\.[0-9]+(?:\.[0-9]+)*)")
_SIZE_LIKE = re.compile(r"(?:(?P<experts>[0-9]+)[xX])?(?P<value>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMBTmbt])")
_LORA_MARKERS = {"lora", "qlora", "dora", "adapter"}

# encoding/quantization tokens: container formats, quantizers, llama.cpp types, precisions, bit widths
_ENCODING_WORDS = {word.lower(): word for word in (
    "GGUF", "GGML", "GPTQ", "AWQ", "EXL2", "EXL3", "MLX", "HQQ", "AQLM", "ONNX", "OpenVINO", "EETQ", "bnb",
    "NF4", "FP4", "F16", "BF16", "F32", "FP16", "FP32", "FP8", "INT4", "INT8", "W4A16", "W8A8", "W8A16")}
_ENCODING_PATTERNS = (
    re.compile(r"(?i)i?q[1-8](?:_[0-9a-z]+)*"),  # llama.cpp types: Q4_K_M, Q8_0, IQ2_XS
    re.compile(r"(?i)tq[12]_0"),
    re.compile(r"(?i)[1-8]bits?"),  # 4bit, 8bit
    re.compile(r"(?i)[0-9]+(?:\.[0-9]+)?bpw"),  # exllama bits per weight
)


def is_encoding(token: str) -> bool:
    """A quantization/encoding token (GGUF, Q4_K_M, AWQ, BF16, 4bit, 4.0bpw)."""
    return token.lower() in _ENCODING_WORDS or any(pattern.fullmatch(token) for pattern in _ENCODING_PATTERNS)


def canonical_encoding(token: str) -> str:
    """The usual spelling of an encoding token: upper case, except ``bnb``, ``OpenVINO``, ``4bit``, ``4.0bpw``."""
    if token.lower() in _ENCODING_WORDS:
        return _ENCODING_WORDS[token.lower()]
    if token.lower().endswith(("bit", "bits", "bpw")):
        return token.lower()
    return token.upper()


def is_lora_marker(token: str) -> bool:
    return token.lower() in _LORA_MARKERS


def is_version_like(token: str) -> bool:
    """``v2``, ``V1.0``, ``v0.3.1``, ``1.0``: something meant as a version."""
    return _VERSION_LIKE.fullmatch(token) is not None


def canonical_version(token: str) -> str | None:
    """``v<Major>.<Minor>`` for a version-like token (``v2`` -> ``v2.0``, ``1.0.3`` -> ``v1.0``), else None."""
    match = _VERSION_LIKE.fullmatch(token)
    if not match:
        return None
    numbers = [n.lstrip("0") or "0" for n in (match["a"] or match["b"]).split(".")]  # as text: any length
    return f"v{numbers[0]}.{numbers[1] if len(numbers) > 1 else 0}"


def is_size_like(token: str) -> bool:
    """``7B``, ``7b``, ``0.5B``, ``8x7b``, ``494M``; a lower-case ``k`` is a context length (``4k``), not a size."""
    return _SIZE_LIKE.fullmatch(token) is not None


def canonical_size(token: str) -> str | None:
    """The Size spelling of a size-like token: upper-case unit, values below 1B in M (``0.5B`` -> ``500M``)."""
    match = _SIZE_LIKE.fullmatch(token)
    if not match:
        return None
    unit = match["unit"].upper()
    value = match["value"]
    if unit in "BT" and float(value) < 1:
        smaller = {"B": "M", "T": "B"}[unit]
        scaled = float(value) * 1000
        value, unit = (f"{scaled:.0f}" if scaled >= 10 else f"{scaled:.1f}"), smaller
    experts = f"{match['experts'].lstrip('0') or '0'}x" if match["experts"] else ""
    return f"{experts}{value}{unit}"


def is_word(token: str) -> bool:
    """A valid part: ASCII letters/digits, ``.`` only between two digits."""
    return _WORD.fullmatch(token) is not None and re.search(r"(?<![0-9])\.|\.(?![0-9])", token) is None


def camel_join(words: list[str]) -> str:
    """Words joined into one part: ``["mini", "4k", "instruct"]`` -> ``Mini4kInstruct``."""
    return "".join(word[:1].upper() + word[1:] for word in words if word)


@dataclass(frozen=True)
class ModelName:
    """A name that follows the schema; ``str(name)`` formats it."""

    family: str
    size: str
    label: str
    method: str
    version: str = "v1.0"
    base_variant: str | None = None
    lora: bool = False
    encoding: str | None = None

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        parts = [self.family, self.size, self.base_variant, self.label, self.method, self.version,
                 LORA if self.lora else None, self.encoding]
        return "-".join(part for part in parts if part)

    @property
    def finetune(self) -> str:
        """The GGUF ``finetune`` field: ``[BaseVariant-]Label-Method``."""
        return "-".join(part for part in (self.base_variant, self.label, self.method) if part)

    @property
    def relation(self) -> Relation:
        method = canonical_method(self.method)
        assert method is not None, self.method
        return relation_of(method, lora=self.lora, encoding=self.encoding)

    def gguf_fields(self) -> dict[str, str]:
        """The model-card keys llama.cpp's converter reads (gguf-py ``Metadata``): it rebuilds the file name
        ``<basename>-<size_label>-<finetune>-<version>-<ENCODING>[-LoRA]`` from them."""
        return {
            "model_name": self.format(),
            "model_basename": self.family,
            "model_size_label": self.size,
            "model_finetune": self.finetune,
            "model_version": self.version,
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "family": self.family, "size": self.size, "base_variant": self.base_variant, "label": self.label,
            "method": self.method, "version": self.version, "lora": self.lora, "encoding": self.encoding,
            "relation": self.relation,
        }


@dataclass
class NameParts:
    """The parts found in a name, conforming or not (any may be missing)."""

    family: str | None = None
    size: str | None = None
    base_variant: str | None = None
    label: str | None = None
    method: str | None = None
    version: str | None = None
    lora: bool = False
    encoding: str | None = None


@dataclass
class Decomposition:
    """A name split into parts by the grammar, with the findings the grammar rules produce."""

    name: str  # the name without the owner
    owner: str | None
    tokens: list[str]
    parts: NameParts = field(default_factory=NameParts)
    findings: list[Finding] = field(default_factory=list)
    family_tokens: list[str] = field(default_factory=list)
    middle_tokens: list[str] = field(default_factory=list)  # between Size and Method
    stray_methods: list[str] = field(default_factory=list)  # methods found outside their place
    stray_encodings: list[str] = field(default_factory=list)

    def model_name(self) -> ModelName | None:
        """The :class:`ModelName` when the grammar found no error."""
        if has_errors(self.findings):
            return None
        p = self.parts
        assert p.family and p.size and p.label and p.method and p.version
        return ModelName(family=p.family, size=p.size, label=p.label, method=p.method, version=p.version,
                         base_variant=p.base_variant, lora=p.lora, encoding=p.encoding)


def _character_findings(name: str) -> list[Finding]:
    findings = []
    if not name.isascii():
        bad = "".join(sorted({c for c in name if not c.isascii()}))
        findings.append(Finding("ascii", f"non-ASCII characters {bad!r}", "transliterate them (e -> e, ss -> ss)"))
    odd = sorted({c for c in name if c.isascii() and not _HUB_CHARS.fullmatch(c)})
    if odd:
        findings.append(Finding("chars", f"characters {''.join(odd)!r} are not allowed",
                                "replace spaces and symbols with '-' or remove them"))
    if len(name) > NAME_MAX_LENGTH:
        findings.append(Finding("length", f"{len(name)} characters", f"shorten the Label to fit {NAME_MAX_LENGTH}"))
    if "--" in name or ".." in name:
        findings.append(Finding("double-separator", "contains '--' or '..'", "use a single '-' between parts"))
    if name[:1] in "-." or name[-1:] in "-.":
        findings.append(Finding("edge-separator", "starts or ends with '-' or '.'",
                                "remove the leading/trailing separator"))
    return findings


def _tokenize(name: str, findings: list[Finding]) -> list[str]:
    tokens: list[str] = []
    underscored = []
    for piece in re.split(r"[-\s]+", name):
        if not piece:
            continue
        if "_" in piece and not (is_encoding(piece) or find_method(piece)):
            underscored.append(piece)
            tokens.extend(p for p in piece.split("_") if p)
        else:
            tokens.append(piece)
    if underscored:
        findings.append(Finding("underscore", f"'_' separates words in {', '.join(underscored)}",
                                "use '-' between parts and CamelCase inside the Label"))
    return tokens


def _take_encoding(tokens: list[str], end: int) -> int:
    while end > 0 and is_encoding(tokens[end - 1]):
        end -= 1
    return end


def _method_at(tokens: list[str], end: int) -> tuple[int, str | None]:
    """The Method ending at ``end`` (two-token spellings such as DARE-TIES first)."""
    for width in (2, 1):
        if end - width >= 0:
            method = find_method("-".join(tokens[end - width:end]))
            if method is not None:
                return end - width, "-".join(tokens[end - width:end])
    return end, None


def decompose(text: str) -> Decomposition:
    """Split ``text`` by the grammar and report where it departs from it (see :mod:`mtool.naming.rules`).

    Reading runs from the end: encoding part, ``LoRA``, version, Method; then the first Size-like part
    splits the rest into Family (before) and ``[BaseVariant-]Label`` (after).
    """
    text = text.strip()
    owner = None
    findings: list[Finding] = []
    if text.count("/") == 1:
        owner, text = text.split("/")
        findings.append(Finding("owner-prefix", f"'{owner}/' is the owner", "nothing to fix"))
    findings += _character_findings(text)
    tokens = _tokenize(text, findings)
    result = Decomposition(name=text, owner=owner, tokens=tokens, findings=findings)
    parts = result.parts

    end = _take_encoding(tokens, len(tokens))
    encoding = tokens[end:]
    lora_at = None
    if end > 0 and is_lora_marker(tokens[end - 1]):
        lora_at = end - 1
        end -= 1
        if not encoding:  # GGUF file order: <...>-v1.0-F16-LoRA
            start = _take_encoding(tokens, end)
            encoding, end = tokens[start:end], start
    if encoding:
        parts.encoding = "-".join(canonical_encoding(t) for t in encoding)
        if parts.encoding != "-".join(encoding):
            findings.append(Finding("encoding-spelling", f"encoding {'-'.join(encoding)}", f"write -{parts.encoding}"))
    if lora_at is not None:
        parts.lora = True
        if tokens[lora_at] != LORA:
            findings.append(Finding("lora-spelling", f"adapter marker {tokens[lora_at]!r}", "write -LoRA"))

    if end > 0 and is_version_like(tokens[end - 1]):
        end -= 1
        parts.version = canonical_version(tokens[end])
        if tokens[end] != parts.version:
            findings.append(Finding("version-format", f"version {tokens[end]!r}",
                                    f"write {parts.version} (Major.Minor; bump Minor for a fix)"))
    else:
        findings.append(Finding("no-version", "no version at the end of the name",
                                "append the artifact's version, -v1.0 for a first release"))

    start, spelled = _method_at(tokens, end)
    if spelled is not None:
        method = find_method(spelled)
        assert method is not None
        parts.method = method.name
        if spelled != method.name:
            findings.append(Finding("method-spelling", f"method {spelled!r}", f"write {method.name}"))
        end = start

    head = tokens[:end]
    for index, token in enumerate(head):
        if is_lora_marker(token) and index > 0:
            findings.append(Finding("lora-position", f"{token!r} inside the name",
                                    "put -LoRA right after the version"))
            parts.lora = True
        elif is_encoding(token):
            result.stray_encodings.append(token)
    if result.stray_encodings:
        findings.append(Finding("quant-position", f"encoding tokens {', '.join(result.stray_encodings)} before the end",
                                "move them to the final encoding part"))
    head = [t for i, t in enumerate(head) if not (is_encoding(t) or (is_lora_marker(t) and i > 0))]

    size_at = next((i for i, token in enumerate(head) if is_size_like(token)), None)
    if size_at is None:
        findings.append(Finding("no-size", "no Size part", "insert the parameter count after the Family, e.g. -8.0B"))
        family, middle = head, []
    else:
        family, middle = head[:size_at], head[size_at + 1:]
        parts.size = canonical_size(head[size_at])
        if parts.size != head[size_at]:
            findings.append(Finding("size-format", f"size {head[size_at]!r}", f"write {parts.size}"))
        if not family:
            findings.append(Finding("no-family", "the name starts with the Size",
                                    "start with the base family, e.g. Llama-3.1-8B-..."))
    result.family_tokens = family
    if family:
        parts.family = "-".join(family)

    for token in list(middle):
        method = find_method(token)
        if method is not None:
            result.stray_methods.append(token)
            middle.remove(token)
    for token in family:
        if find_method(token) is not None:
            result.stray_methods.append(token)
    if result.stray_methods:
        if parts.method:
            findings.append(Finding("multiple-methods", f"methods {', '.join(result.stray_methods)} and {parts.method}",
                                    f"keep only the last operation's method ({parts.method}); "
                                    "the card records the rest"))
        else:
            method = find_method(result.stray_methods[-1])
            assert method is not None
            parts.method = method.name
            findings.append(Finding("method-position", f"method {result.stray_methods[-1]!r} is not before the version",
                                    f"move {method.name} right before the version"))
    elif parts.method is None:
        findings.append(Finding("no-method", "no Method from the closed list",
                                "add the Method before the version: SFT, DPO, SLERP, TIES, ... (see docs/naming.md)"))

    extra_sizes = [t for t in middle if is_size_like(t)]
    if extra_sizes:
        findings.append(Finding("multiple-sizes", f"sizes {', '.join(extra_sizes)} after {head[size_at]}",
                                "keep one Size, right after the Family"))
        middle = [t for t in middle if not is_size_like(t)]
    versions = [t for t in middle if is_version_like(t)]
    if versions:
        findings.append(Finding("version-position", f"version-like part {versions[0]!r} before the Method",
                                "fold it into the Label (KimikoV2) or drop it"))
    result.middle_tokens = middle
    if len(middle) == 1:
        parts.label = middle[0]
    elif len(middle) == 2:
        parts.base_variant, parts.label = middle
    elif len(middle) > 2:
        findings.append(Finding("too-many-parts", f"{len(middle)} parts between Size and Method: {'-'.join(middle)}",
                                f"keep [BaseVariant-]Label, e.g. {middle[0]}-{camel_join(middle[1:])}"))
        parts.base_variant, parts.label = middle[0], camel_join(middle[1:])
    elif size_at is not None:
        findings.append(Finding("no-label", "no Label between the Size and the Method",
                                "add a Label that says what this artifact is, e.g. -Medic-"))

    misplaced_dots = [t for t in family + middle if not is_word(t) and _HUB_CHARS.fullmatch(t)]
    if misplaced_dots:
        findings.append(Finding("dot-outside-number", f"'.' outside a number in {', '.join(misplaced_dots)}",
                                "use '.' only between digits; join words in CamelCase"))
    return result
