"""Hostile records: training data files (``mtool train``) and model names (``mtool name lint|parse``)."""

from __future__ import annotations

import os

from tests.hostile.cases import Case, Env, Run, write_text

# name -> (file name, contents, the 1-based line the error must name)
DATA: dict[str, tuple[str, str | bytes, int]] = {
    "json-array-of-numbers": ("data.json", "[1, 2, 3]\n", 1),
    "json-array-of-strings": ("data.json", '[\n  "one",\n  "two"\n]\n', 2),
    "json-array-one-number": ("data.json", '[\n  {"text": "a"},\n  42\n]\n', 3),
    "json-array-missing-comma": ("data.json", '[\n  {"text": "a"}\n  {"text": "b"}\n]\n', 3),
    "json-text-after-array": ("data.json", '[{"text": "a"}]\n{"text": "b"}\n', 2),
    "json-columns-not-records": ("data.json", '{"text": ["a", "b"]}\n', 1),
    "jsonl-latin1-line": ("data.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),
    "jsonl-list-line": ("data.jsonl", '{"text": "a"}\n{"text": "b"}\n[1, 2]\n', 3),
    "jsonl-string-line": ("data.jsonl", '"just text"\n', 1),
    "jsonl-broken-json": ("data.jsonl", '{"text": "a"}\n\n{"text": "b",}\n', 3),
    "jsonl-huge-integer": ("data.jsonl", '{"text": "a", "n": ' + "9" * 5000 + "}\n", 1),
    "jsonl-text-is-number": ("data.jsonl", '{"text": "a"}\n{"text": 5}\n', 2),
    "jsonl-text-is-nan": ("data.jsonl", '{"text": NaN}\n', 1),
    "jsonl-lone-surrogate": ("data.jsonl", '{"text": "a"}\n{"text": "\\udc80 broken"}\n', 2),
    "json-array-lone-surrogate": ("data.json", '[\n  {"text": "a"},\n  {"text": "\\ud800"}\n]\n', 3),
    "jsonl-text-is-list": ("data.jsonl", '{"text": "a"}\n{"text": ["b"]}\n', 2),
    "alpaca-output-is-number": ("data.jsonl", '{"instruction": "Add", "input": "1+1", "output": 2}\n', 1),
    "alpaca-instruction-is-object": ("data.jsonl", '{"instruction": {"q": 1}, "output": "x"}\n', 1),
    "chat-content-is-list": ("data.jsonl", '{"messages": [{"role": "user", "content": "hi"}, '
                                           '{"role": "assistant", "content": [{"type": "text"}]}]}\n', 1),
    "chat-role-is-number": ("data.jsonl", '{"messages": [{"role": 1, "content": "hi"}]}\n', 1),
    "chat-messages-is-string": ("data.jsonl", '{"messages": "hello"}\n', 1),
    "chat-messages-empty": ("data.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n{"messages": []}\n', 2),
    "chat-message-is-string": ("data.jsonl", '{"messages": ["hello"]}\n', 1),
    "prompt-is-number": ("data.jsonl", '{"prompt": 1, "completion": "x"}\n', 1),
    "csv-latin1-row": ("data.csv", b"text\nhello\ncaf\xe9\n", 3),
}


def _data_case(name: str, filename: str, contents: str | bytes, line: int) -> Case:
    def build(env: Env) -> Run:
        data = write_text(env.root / filename, contents)
        args = ["train", "--base", str(env.base), "--data", str(data), "--out", str(env.out), "--quantization",
                "none", "--compute-dtype", "float32", "--optimizer", "adamw", "--max-steps", "1", "--rank", "2"]
        return Run(args, inputs=[data, env.base], output=env.out, where=f"{data}, line {line}",
                   extra_outputs=[env.root / "out-checkpoints"])
    return Case("data", name, build)


CASES: list[Case] = [_data_case(name, *spec) for name, spec in DATA.items()]

# Names for `mtool name lint` / `name parse`: none is an error of mtool's (exit 0 with no finding, 1 with findings,
# 2 for an empty name), and whatever is echoed must be printable text on one line per finding.
_NOT_UTF8 = os.fsdecode(b"Llama-3-8B-\xff\xfe-SFT-v1.0")  # what Python makes of argv bytes that are not UTF-8
NAMES: dict[str, str] = {
    "invalid-utf8": _NOT_UTF8,
    "lone-continuation-byte": os.fsdecode(b"Mistral-7B-\x80-v1.0"),
    "terminal-escape": "Llama-3-8B-\x1b[2J\x1b[31mEvil-SFT-v1.0",
    "newline-forged-line": "Llama-3-8B-Medic-SFT-v1.0\nerror: forged",
    "carriage-return": "Llama-3-8B-Medic\r-SFT-v1.0",
    "right-to-left-override": "Llama-3-8B-\u202eTFS-v1.0",
    "zero-width-joiner": "Llama-3-8B-Med\u200dic-SFT-v1.0",
    "combining-marks": "Llama-3-8B-Me\u0301\u0301\u0301dic-SFT-v1.0",
    "emoji": "Llama-3-8B-\U0001f525-SFT-v1.0",
    "ten-thousand-chars": "Llama-" + "x" * 10_000,
    "two-thousand-dashes": "-" * 2_000,
    "only-versions": "-".join(["v1.0"] * 300),
    "slashes": "a/b/c/d/Llama-3-8B-SFT-v1.0",
    "empty": "",
    "spaces": "   ",
    "nul-free-control": "\x07\x08\x0b\x0c",
}
