"""Hostile weights: safetensors headers (each read by ``mtool info`` and by ``mtool merge``), shard indexes (the
same two commands) and model folders that are not what they claim."""

from __future__ import annotations

import json
from pathlib import Path

from tests.hostile.cases import Case, Env, Run, linear_recipe, model_folder, safetensors_bytes, tensor, write_text

OK = tensor()  # F32 [2] at [0, 8)
ENTRY = b'{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'  # the same, as header bytes
EIGHT = b"\0" * 8

# name -> the file's bytes
HEADERS: dict[str, bytes] = {
    "shorter-than-length-prefix": b"\x08\x00\x00",
    "length-beyond-file": safetensors_bytes({"a": OK}, EIGHT, length=10_000),
    "length-over-100MB": safetensors_bytes({"a": OK}, EIGHT, length=200_000_000),
    "length-2^64-1": safetensors_bytes({"a": OK}, EIGHT, length=2**64 - 1),
    "header-not-utf8": safetensors_bytes(None, EIGHT, raw=b'{"\xff\xfe":' + ENTRY + b"}"),
    "header-not-json": safetensors_bytes(None, EIGHT, raw=b'{"a": {"dtype": "F32",'),
    "header-is-list": safetensors_bytes([1, 2, 3], EIGHT),
    "header-is-string": safetensors_bytes("model", EIGHT),
    "header-nan-literal": safetensors_bytes(None, EIGHT, raw=b'{"__metadata__":{"x":NaN},"a":' + ENTRY + b"}"),
    "header-trailing-nul": safetensors_bytes(None, EIGHT, raw=b'{"a":' + ENTRY + b"}\0"),
    "lone-surrogate-in-name": safetensors_bytes(None, EIGHT, raw=b'{"a\\ud800":' + ENTRY + b"}"),
    "duplicate-tensor-name": safetensors_bytes(None, b"\0" * 16, raw=b'{"a":' + ENTRY + b',"a":'
                                               b'{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'),
    "dtype-is-list": safetensors_bytes({"a": tensor(dtype=["F32"])}, EIGHT),
    "dtype-unknown": safetensors_bytes({"a": tensor(dtype="F33")}, EIGHT),
    "dtype-lowercase": safetensors_bytes({"a": tensor(dtype="f32")}, EIGHT),
    "dtype-null": safetensors_bytes({"a": tensor(dtype=None)}, EIGHT),
    "shape-negative": safetensors_bytes({"a": tensor(shape=[-2], offsets=[0, 0])}),
    "shape-negative-pair": safetensors_bytes({"a": tensor(shape=[-2, -1], offsets=[0, 8])}, EIGHT),
    "shape-float": safetensors_bytes({"a": tensor(shape=[2.0])}, EIGHT),
    "shape-bool": safetensors_bytes({"a": tensor(shape=[True, 2])}, EIGHT),
    "shape-string": safetensors_bytes({"a": tensor(shape="2")}, EIGHT),
    "shape-5000-digits": safetensors_bytes(None, EIGHT, raw=b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000
                                          + b'],"data_offsets":[0,8]}}'),
    "shape-overflows-64-bits": safetensors_bytes({"a": tensor(shape=[2**62, 4, 4], offsets=[0, 8])}, EIGHT),
    "offsets-overlap": safetensors_bytes({"a": OK, "b": tensor(offsets=[0, 8])}, EIGHT),
    "offsets-overlap-partly": safetensors_bytes({"a": tensor(shape=[4], offsets=[0, 16]), "b": tensor(offsets=[8, 16])},
                                                b"\0" * 16),
    "offsets-gap": safetensors_bytes({"a": tensor(offsets=[4, 12])}, b"\0" * 12),
    "offsets-reversed": safetensors_bytes({"a": tensor(shape=[0], offsets=[8, 0])}, EIGHT),
    "offsets-three": safetensors_bytes({"a": tensor(offsets=[0, 8, 16])}, EIGHT),
    "offsets-negative": safetensors_bytes({"a": tensor(shape=[0], offsets=[-8, -8])}),
    "offsets-disagree-with-shape": safetensors_bytes({"a": tensor(shape=[3], offsets=[0, 8])}, EIGHT),
    "offsets-strings": safetensors_bytes({"a": tensor(offsets=["0", "8"])}, EIGHT),
    "bytes-after-last-tensor": safetensors_bytes({"a": OK}, b"\0" * 24),
    "truncated-data": safetensors_bytes({"a": tensor(shape=[1024], offsets=[0, 4096])}, b"\0" * 100),
    "metadata-is-list": safetensors_bytes({"__metadata__": ["format", "pt"], "a": OK}, EIGHT),
    "metadata-int-value": safetensors_bytes({"__metadata__": {"format": 1}, "a": OK}, EIGHT),
    "metadata-nested": safetensors_bytes({"__metadata__": {"format": {"x": "y"}}, "a": OK}, EIGHT),
    "metadata-deep-nesting": safetensors_bytes(None, EIGHT, raw=b'{"__metadata__":' + b"[" * 50_000 + b"]" * 50_000
                                               + b',"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    "entry-is-number": safetensors_bytes({"a": 5}),
    "entry-missing-dtype": safetensors_bytes({"a": {"shape": [2], "data_offsets": [0, 8]}}, EIGHT),
    "entry-missing-offsets": safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, EIGHT),
    "f4-half-byte": safetensors_bytes({"a": tensor(dtype="F4", shape=[3], offsets=[0, 2])}, b"\0\0"),
    "huge-name-bad-offsets": safetensors_bytes({"n" * 1_000_000: tensor(offsets=[0, 9])}, b"\0" * 9),
    "control-characters-in-name": safetensors_bytes({"\x1b[2J\x1b[31mevil\n": tensor(offsets=[0, 4])}, b"\0" * 4),
}


def _header_info(name: str, blob: bytes) -> Case:
    def build(env: Env) -> Run:
        path = write_text(env.root / f"{name}.safetensors", blob)
        return Run(["info", str(path)], inputs=[path], where=str(path))
    return Case("headers", f"{name}/info", build)


def _header_merge(name: str, blob: bytes) -> Case:
    def build(env: Env) -> Run:
        bad = model_folder(env.root / "bad-model", env, blob)
        recipe = linear_recipe(env.root / "recipe.yaml", env.base, bad)
        return Run(["merge", str(recipe), str(env.out)], inputs=[bad, recipe, env.base], output=env.out,
                   where=str(bad / "model.safetensors"))
    return Case("headers", f"{name}/merge", build)


# -- shard indexes ----------------------------------------------------------------------------------------------


def _sharded(env: Env, folder: Path, index: str | bytes | dict | list) -> Path:
    """A two-shard folder whose index is ``index`` (a dict or list is written as JSON)."""
    model_folder(folder, env)
    write_text(folder / "model-00001-of-00002.safetensors", safetensors_bytes({"x.a": OK}, EIGHT))
    write_text(folder / "model-00002-of-00002.safetensors", safetensors_bytes({"x.b": OK}, EIGHT))
    text = json.dumps(index) if isinstance(index, (dict, list)) else index
    write_text(folder / "model.safetensors.index.json", text)
    return folder


GOOD_MAP = {"x.a": "model-00001-of-00002.safetensors", "x.b": "model-00002-of-00002.safetensors"}

INDEXES: dict[str, str | bytes | dict | list] = {
    "not-json": '{"weight_map": {"x.a": ',
    "not-utf8": b'{"weight_map": {"x.a\xff": "model-00001-of-00002.safetensors"}}',
    "is-list": [GOOD_MAP],
    "weight-map-missing": {"metadata": {"total_size": 16}},
    "weight-map-is-list": {"weight_map": list(GOOD_MAP.items())},
    "weight-map-is-string": {"weight_map": "model-00001-of-00002.safetensors"},
    "weight-map-int-value": {"weight_map": {**GOOD_MAP, "x.b": 2}},
    "weight-map-null-value": {"weight_map": {**GOOD_MAP, "x.b": None}},
    "weight-map-empty": {"weight_map": {}},
    "file-outside-folder": {"weight_map": {**GOOD_MAP, "x.b": "../outside.safetensors"}},
    "file-absolute-path": {"weight_map": {**GOOD_MAP, "x.b": "/etc/passwd"}},
    "file-is-pickle": {"weight_map": {**GOOD_MAP, "x.b": "pytorch_model.bin"}},
    "file-missing": {"weight_map": {**GOOD_MAP, "x.b": "model-00009-of-00009.safetensors"}},
    "tensor-not-in-shards": {"weight_map": {**GOOD_MAP, "x.c": "model-00002-of-00002.safetensors"}},
    "tensor-in-other-shard": {"weight_map": {"x.a": "model-00002-of-00002.safetensors",
                                             "x.b": "model-00002-of-00002.safetensors"}},
    "huge-integer": '{"metadata": {"total_size": ' + "7" * 6000 + '}, "weight_map": ' + json.dumps(GOOD_MAP) + "}",
    "deep-nesting": '{"metadata": ' + "[" * 100_000 + "]" * 100_000 + ', "weight_map": ' + json.dumps(GOOD_MAP) + "}",
}


def _index_info(name: str, index: str | bytes | dict | list) -> Case:
    def build(env: Env) -> Run:
        folder = _sharded(env, env.root / "sharded", index)
        outside = write_text(env.root / "outside.safetensors", safetensors_bytes({"x.b": OK}, EIGHT))
        return Run(["info", str(folder)], inputs=[folder, outside], where=str(folder / "model.safetensors.index.json"))
    return Case("index", f"{name}/info", build)


def _index_merge(name: str, index: str | bytes | dict | list) -> Case:
    def build(env: Env) -> Run:
        folder = _sharded(env, env.root / "sharded", index)
        outside = write_text(env.root / "outside.safetensors", safetensors_bytes({"x.b": OK}, EIGHT))
        recipe = linear_recipe(env.root / "recipe.yaml", env.base, folder)
        return Run(["merge", str(recipe), str(env.out)], inputs=[folder, outside, recipe, env.base], output=env.out,
                   where=str(folder / "model.safetensors.index.json"))
    return Case("index", f"{name}/merge", build)


# -- model folders ----------------------------------------------------------------------------------------------


def _pickle_base_for_training(env: Env) -> Run:
    folder = model_folder(env.root / "pickled", env)
    write_text(folder / "pytorch_model.bin", b"\x80\x04\x95 pickle that would run code")
    data = write_text(env.root / "data.jsonl", '{"text": "hello"}\n')
    args = ["train", "--base", str(folder), "--data", str(data), "--out", str(env.out), "--quantization", "none",
            "--max-steps", "1"]
    return Run(args, inputs=[folder, data], output=env.out, where=str(folder),
               extra_outputs=[env.root / "out-checkpoints"])


def _dev_zero_model(env: Env) -> Run:
    recipe = write_text(env.root / "recipe.yaml", f"merge_method: linear\nmodels:\n  - model: {env.base}\n"
                                                  "  - model: /dev/zero\n")
    return Run(["merge", str(recipe), str(env.out)], inputs=[recipe, env.base], output=env.out, where="/dev/zero")


def _config_is_list(env: Env) -> Run:
    folder = model_folder(env.root / "model", env, safetensors_bytes({"a": OK}, EIGHT))
    write_text(folder / "config.json", "[1, 2, 3]")
    return Run(["info", str(folder)], inputs=[folder], where=str(folder / "config.json"))


def _config_not_utf8(env: Env) -> Run:
    folder = model_folder(env.root / "model", env, safetensors_bytes({"a": OK}, EIGHT))
    write_text(folder / "config.json", b'{"model_type": "llama\xe9"}')
    recipe = linear_recipe(env.root / "recipe.yaml", env.base, folder)
    return Run(["merge", str(recipe), str(env.out)], inputs=[folder, recipe, env.base], output=env.out,
               where=f"{folder / 'config.json'}, line 1")


def _weights_are_a_folder(env: Env) -> Run:
    folder = model_folder(env.root / "model", env)
    (folder / "model.safetensors").mkdir()
    return Run(["info", str(folder)], inputs=[folder], where=str(folder / "model.safetensors"))


def _pickle_only_merge(env: Env) -> Run:
    folder = model_folder(env.root / "pickled", env)
    write_text(folder / "pytorch_model.bin", b"\x80\x04\x95 pickle that would run code")
    recipe = linear_recipe(env.root / "recipe.yaml", env.base, folder)
    return Run(["merge", str(recipe), str(env.out)], inputs=[folder, recipe, env.base], output=env.out,
               where=str(folder))


MODEL_CASES = [Case("model", "train-base-with-pickle-weights", _pickle_base_for_training),
               Case("model", "merge-model-is-dev-zero", _dev_zero_model),
               Case("model", "config-json-is-a-list", _config_is_list),
               Case("model", "config-json-not-utf8", _config_not_utf8),
               Case("model", "weights-file-is-a-folder", _weights_are_a_folder),
               Case("model", "merge-pickle-only-model", _pickle_only_merge)]

CASES: list[Case] = (
    [builder(name, blob) for name, blob in HEADERS.items() for builder in (_header_info, _header_merge)]
    + [builder(name, index) for name, index in INDEXES.items() for builder in (_index_info, _index_merge)]
    + MODEL_CASES
)
