"""Property-based fuzzing (Hypothesis) of the parsers that read untrusted input: whatever they are given, they
return a result or raise mtool's own error, never anything else (which the CLI would report as "unexpected").

The slow tier (``pytest -m fuzz``, run by scripts/test.sh and so by CI): ``MTOOL_FUZZ_EXAMPLES`` examples per
target (default 10,000). Targets:

- the safetensors header reader, on random bytes and on headers built from mutated valid ones, checked against
  the safetensors library itself: mtool accepts only files safetensors accepts (with the same tensors), and every
  file safetensors accepts without a repeated key;
- the recipe loader (YAML + schema), on random text and on recipe-shaped YAML with anchors, aliases, repeated
  keys, tags and odd scalars;
- the adapter-config loader (bounded JSON + schema + the rank/alpha pattern lookups);
- the name parser and linter, on random text (bytes that are not UTF-8 included) and on name-shaped token lists.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtool.errors import MtoolError

EXAMPLES = int(os.environ.get("MTOOL_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = pytest.mark.fuzz

# -- JSON-like values ---------------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
# one level of containers (cheap to draw: most of a fuzz run's time is drawing examples), nested ones now and then
FLAT_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS,
                                                                                 max_size=3))
JSON_VALUES = st.one_of(FLAT_VALUES, st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8))

# -- the safetensors header reader --------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F4", "F6_E2M3", "F8_E4M3", "C64"]
SIZES = {"F32": 32, "F16": 16, "BF16": 16, "F64": 64, "I8": 8, "U8": 8, "BOOL": 8, "I64": 64, "F4": 4, "F6_E2M3": 6,
         "F8_E4M3": 8, "C64": 64}


@st.composite
def header_files(draw) -> bytes:
    """A valid file of a few small tensors, then a few mutations of its header, offsets, length or data."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=0, max_size=4, unique=True))
    header: dict = {}
    position = 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        count = 1
        for size in shape:
            count *= size
        if (count * SIZES[dtype]) % 8:
            shape, count = shape + [2], count * 2
        nbytes = count * SIZES[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                                                          max_size=2), JSON_VALUES))
    for _ in range(draw(st.integers(0, 3))):
        if not header:
            break
        key = draw(st.sampled_from(sorted(header)))
        target = draw(st.sampled_from(["entry", "dtype", "shape", "data_offsets", "drop"]))
        if target == "entry":
            header[key] = draw(FLAT_VALUES)
        elif target == "drop":
            del header[key]
        elif isinstance(header[key], dict):
            header[key][target] = draw(st.one_of(FLAT_VALUES, st.lists(st.integers(-3, 2**65), max_size=3)))
    raw = json.dumps(header, allow_nan=True).encode()
    if draw(st.booleans()):  # raw byte edits of the JSON
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, max(0, len(raw) - 1)))
            raw = raw[:at] + draw(st.binary(max_size=3)) + raw[at + 1:]
    data = bytes(position) + draw(st.sampled_from([b"", b"", b"\0", b"\0" * 8]))
    data = data[: draw(st.integers(0, len(data)))] if draw(st.integers(0, 9)) == 0 else data
    length = len(raw) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + data


def _safetensors_reads(blob: bytes) -> dict | None:
    import safetensors

    try:
        return {name: tensor["shape"] for name, tensor in safetensors.deserialize(blob)}
    except Exception:  # noqa: BLE001 - any refusal of the reference library
        return None


def _repeats_a_key(raw: bytes) -> bool:
    try:
        seen = []
        json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]].decode(), object_pairs_hook=lambda pairs: seen.append(
            len(pairs) != len({key for key, _ in pairs})) or dict(pairs))
        return any(seen)
    except Exception:  # noqa: BLE001 - not JSON: no key at all
        return False


def _dtype_not_a_string(raw: bytes) -> bool:
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]].decode())
    return any(isinstance(entry, dict) and not isinstance(entry.get("dtype"), str)
               for key, entry in header.items() if key != "__metadata__")


@FUZZ
@given(blob=st.one_of(header_files(), st.binary(max_size=200)))
def test_header_reader_raises_only_mtool_errors_and_is_as_strict_as_safetensors(blob: bytes) -> None:
    from mtool.io.header import parse_file_bytes

    try:
        entries, metadata = parse_file_bytes(blob, where="fuzz.safetensors")
    except MtoolError as error:
        entries = None
        assert len(error.message) < 2000
    reference = _safetensors_reads(blob)
    if entries is not None:  # mtool accepts only what safetensors accepts, and reads the same tensors
        assert reference is not None
        assert {entry.name: list(entry.shape) for entry in entries} == reference
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    elif reference is not None:  # and refuses a file safetensors accepts only for a key given twice (or for a
        assert _repeats_a_key(blob) or _dtype_not_a_string(blob)  # dtype in a form safetensors has added since)


# -- the recipe loader --------------------------------------------------------------------------------------------

RECIPE_KEYS = ["merge_method", "models", "model", "slices", "sources", "layer_range", "base_model", "parameters",
               "weight", "density", "t", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template",
               "name", "modules", "filter", "value", "lora", "path"]
YAML_SCALARS = st.one_of(st.sampled_from(["linear", "slerp", "ties", "~", "null", ".nan", "-.inf", "yes", "0x1f",
                                          "1e400", "2024-13-45", "!!binary aGk=", "!!python/name:os.system", "*a",
                                          "&a x", "'q''uote'", '"\\0"', "[1, [2]]", "{a: 1}", "|\n  text", "<<: *a",
                                          "9" * 5000, "a@b+c", "/dev/zero", "../x", ""]),
                         st.text(max_size=10).map(json.dumps))


@st.composite
def recipe_yaml(draw) -> str:
    """Recipe-shaped YAML: nested mappings and lists over recipe keys, with anchors, aliases, tags and repeats."""
    lines = []
    anchors: list[str] = []
    for _ in range(draw(st.integers(1, 12))):
        indent = "  " * draw(st.integers(0, 3))
        key = draw(st.sampled_from(RECIPE_KEYS))
        dash = "- " if draw(st.integers(0, 3)) == 0 else ""
        value = draw(YAML_SCALARS)
        if anchors and draw(st.integers(0, 4)) == 0:
            value = "*" + draw(st.sampled_from(anchors)) + draw(st.sampled_from(["", "", " ", "]"]))
        elif draw(st.integers(0, 5)) == 0:
            name = f"a{len(anchors)}"
            anchors.append(name)
            value = f"&{name} " + draw(st.sampled_from(["[1, 2]", "{weight: 1}", "x", ""]))
        lines.append(f"{indent}{dash}{key}: {value}")
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n---\n", "\t", "\n\x00"]))


@FUZZ
@given(text=st.one_of(recipe_yaml(), st.text(max_size=300)))
def test_recipe_loader_raises_only_mtool_errors(text: str) -> None:
    from mtool.merger.recipe import parse_recipe

    try:
        parse_recipe(text, source="fuzz.yaml")
    except MtoolError as error:
        assert len(error.message) < 2000 and "\n" not in error.what


# -- the adapter-config loader ------------------------------------------------------------------------------------

ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern",
                "alpha_pattern", "modules_to_save", "target_modules", "trainable_token_indices",
                "base_model_name_or_path", "use_alora", "layer_replication", "task_type"]
PATTERN_KEYS = st.one_of(st.sampled_from(["q_proj", "v_proj", r"layers\.0\..*", "(a+)+$", "q_proj(", "[", "*",
                                          "(?P<x>.*)", r"\d+", ""]), st.text(max_size=8))


@st.composite
def adapter_configs(draw) -> dict:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(ADAPTER_KEYS))
        if key in ("rank_pattern", "alpha_pattern", "trainable_token_indices") and draw(st.booleans()):
            config[key] = draw(st.dictionaries(PATTERN_KEYS, st.one_of(st.integers(-2, 9), SCALARS), max_size=3))
        else:
            config[key] = draw(FLAT_VALUES)
    if draw(st.integers(0, 5)) == 0:
        config = draw(JSON_VALUES)
    return config


@FUZZ
@given(config=adapter_configs(), raw=st.one_of(st.none(), st.binary(max_size=80)),
       modules=st.lists(st.sampled_from(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                                         "lm_head", "a" * 60, ""]), max_size=3))
def test_adapter_config_loader_raises_only_mtool_errors(config, raw, modules) -> None:
    from mtool.io.jsonfiles import parse_json_object
    from mtool.lora.adapter import settings_from_config

    blob = raw if raw is not None else json.dumps(config, allow_nan=True).encode()
    try:
        data = parse_json_object(blob, what="adapter_config.json", where="fuzz", fix="-")
        settings = settings_from_config(data, "fuzz")
        for module in modules:
            assert settings.rank_for(module) > 0
            settings.alpha_for(module)
    except MtoolError as error:
        assert len(error.message) < 2000


# -- the name parser and linter -----------------------------------------------------------------------------------

NAME_TOKENS = st.sampled_from(["Llama", "3.1", "8B", "Mistral", "v0.2", "7B", "Instruct", "Medic", "SFT", "DPO",
                               "SLERP", "TIES", "DARE", "v1.0", "v2", "LoRA", "GGUF", "Q4_K_M", "8x7B", "1.5",
                               "Qwen2.5", "gemma-2", "it", "bnb", "4bit", "x", "", "..", "v" + "9" * 5000,
                               "9" * 5000 + "B", "_", " "])


@FUZZ
@given(text=st.one_of(st.lists(NAME_TOKENS, max_size=10).map("-".join), st.text(max_size=120),
                      st.binary(max_size=60).map(os.fsdecode)))
def test_name_parser_and_linter_raise_only_mtool_errors(text: str) -> None:
    from mtool.naming.lint import lint_name
    from mtool.naming.schema import decompose

    try:
        decomposition = decompose(text)
        decomposition.model_name()
        report = lint_name(text)
        json.dumps(report.to_dict())
    except MtoolError as error:
        assert len(error.message) < 2000
