"""Training data: loading, format detection, chat templates, response-only labels, EOS, truncation."""

from __future__ import annotations

import hashlib
import json

import pytest

from mtool.errors import InputError
from mtool.io.hashing import FileHasher
from mtool.train.batching import collate
from mtool.train.data import IGNORE_INDEX, find_data, load_records, split_for_eval, tokenize_dataset, tokenize_rendered
from mtool.train.formats import ChatRenderer, detect_format, render_record
from mtool.train.tokenizer import load_tokenizer, prepare_tokenizer
from tests.support.train_helpers import alpaca_records, chat_records, write_jsonl

END = "<|end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama))


def tokenize(tokenizer, record, data_format, *, seq_len=256, train_on_prompt=False):
    rendered = render_record(record, data_format, ChatRenderer(tokenizer, tokenizer.chat_template),
                             train_on_prompt=train_on_prompt, where="test")
    return tokenize_rendered(tokenizer, rendered, seq_len)


def trained_and_prompt_text(tokenizer, example):
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    prompt = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))
    return tokenizer.decode(trained), tokenizer.decode(prompt)


def test_alpaca_is_trained_on_the_response_and_the_stop_tokens(tokenizer):
    record = {"instruction": "What is the capital of France?", "input": "Answer briefly.",
              "output": "The capital of France is Paris."}
    example = tokenize(tokenizer, record, "alpaca")
    trained, prompt = trained_and_prompt_text(tokenizer, example)
    # the tiny model's template: <|role|>\n content <|end|>\n per message, then the generation prompt
    assert prompt == f"<|user|>\nWhat is the capital of France?\n\nAnswer briefly.{END}\n<|assistant|>\n"
    assert trained == f"The capital of France is Paris.{END}\n</s>"
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.cut == 0


def test_chat_trains_every_assistant_turn_only(tokenizer):
    example = tokenize(tokenizer, chat_records(1)[0], "chat")
    trained, prompt = trained_and_prompt_text(tokenizer, example)
    assert trained == f"Paris.{END}\ncba{END}\n</s>"
    assert prompt == f"<|user|>\nCapital of France?{END}\n<|assistant|>\n<|user|>\nReverse the string: abc{END}\n" \
                     "<|assistant|>\n"
    everything = tokenize(tokenizer, chat_records(1)[0], "chat", train_on_prompt=True)
    assert all(label != IGNORE_INDEX for label in everything.labels)


def test_sharegpt_prompt_completion_and_text(tokenizer):
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    trained, _ = trained_and_prompt_text(tokenizer, tokenize(tokenizer, sharegpt, "chat"))
    assert trained == f"Hello{END}\n</s>"
    pair = {"prompt": "Question: what is two plus two? Answer:", "completion": " four."}
    trained, prompt = trained_and_prompt_text(tokenizer, tokenize(tokenizer, pair, "prompt_completion"))
    assert (prompt, trained) == ("Question: what is two plus two? Answer:", " four.</s>")
    conversational = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant",
                                                                                      "content": "Yo"}]}
    trained, _ = trained_and_prompt_text(tokenizer, tokenize(tokenizer, conversational, "prompt_completion"))
    assert trained == f"Yo{END}\n</s>"
    trained, prompt = trained_and_prompt_text(tokenizer, tokenize(tokenizer, {"text": "a b c"}, "text"))
    assert (prompt, trained) == ("", "a b c</s>")


def test_eos_that_doubles_as_pad_is_still_learned(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.pad_token = tokenizer.eos_token
    short = tokenize(tokenizer, {"text": "a b"}, "text")
    longer = tokenize(tokenizer, {"text": "a b c d e f"}, "text")
    assert short.labels[-1] == tokenizer.eos_token_id
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, longer)], packing=False,
                    pad_id=tokenizer.pad_token_id)
    row = batch.inputs["labels"][0].tolist()
    assert row[len(short.labels) - 1] == tokenizer.eos_token_id  # kept, although it equals the pad id
    assert row[len(short.labels):] == [IGNORE_INDEX] * (len(longer.labels) - len(short.labels))  # padding masked


def test_truncation_counted_and_untrainable_examples_dropped(tokenizer, tmp_path, capsys):
    from mtool.train.config import load_config
    from mtool.train.run import _report_data, prepare_data

    records = [{"prompt": "Question: " + "a b c d e f g h " * 8, "completion": " yes"},  # response cut away
               {"prompt": "Q:", "completion": " " + "x y z " * 20},  # response cut, but partly kept
               {"prompt": "Q:", "completion": ""},  # nothing to learn but the EOS: kept
               {"prompt": "Q:", "completion": " fine"}]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    config = load_config(None, {"base": "m", "out": str(tmp_path / "o"), "data.path": [str(path)], "data.seq_len": 16})
    data = prepare_data(config, tokenizer)
    assert (data.stats.examples, data.stats.kept, data.stats.dropped, data.stats.truncated) == (4, 3, 1, 2)
    assert max(data.train["length"]) == 16 and len(data.train) == 3
    _report_data(config, data)
    err = capsys.readouterr().err
    assert "1 of 4 examples have no token to train on" in err and "2 of 4 examples are longer" in err
    write_jsonl(path, records[:1])
    with pytest.raises(InputError, match="none of the 1 examples has a token to train on"):
        prepare_data(config, tokenizer)


def test_named_template_adds_its_markers_and_is_kept(tiny_llama):
    from mtool.chat_templates import BUILTIN_TEMPLATES

    tokenizer = load_tokenizer(str(tiny_llama))
    size = len(tokenizer)
    setup = prepare_tokenizer(tokenizer, chat_template="chatml", data_format="chat", add_tokens=["<|tool|>"])
    assert setup.added_tokens == ["<|tool|>", "<|im_start|>", "<|im_end|>"]
    assert len(tokenizer) == size + 3 and tokenizer.chat_template == BUILTIN_TEMPLATES["chatml"]
    assert len(tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1
    example = tokenize(tokenizer, chat_records(1)[0], "chat")
    trained, _ = trained_and_prompt_text(tokenizer, example)
    assert trained == "Paris.<|im_end|>\ncba<|im_end|>\n</s>"


def test_chat_data_needs_a_template(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.chat_template = None
    setup = prepare_tokenizer(tokenizer, chat_template=None, data_format="chat", add_tokens=[])
    with pytest.raises(InputError, match="no chat template"):
        render_record(chat_records(1)[0], "chat", ChatRenderer(tokenizer, setup.template), train_on_prompt=False,
                      where="x")
    alpaca = prepare_tokenizer(tokenizer, chat_template=None, data_format="alpaca", add_tokens=[])
    assert "### Instruction:" in alpaca.template  # alpaca data falls back to the Alpaca prompt format


def test_formats_detected_from_columns():
    assert detect_format(["messages"], "x") == "chat"
    assert detect_format(["conversations", "id"], "x") == "chat"
    assert detect_format(["instruction", "input", "output"], "x") == "alpaca"
    assert detect_format(["prompt", "completion"], "x") == "prompt_completion"
    assert detect_format(["text", "meta"], "x") == "text"
    with pytest.raises(InputError, match="cannot tell the data format"):
        detect_format(["question", "answer"], "x")


def test_every_file_type_and_saved_datasets_load_the_same_records(tmp_path):
    import datasets

    records = alpaca_records(5)
    table = datasets.Dataset.from_list(records)
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "a.json").write_text(json.dumps(records))
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv", "saved"):
        loaded = load_records(find_data([str(tmp_path / name)]))
        as_read = [{k: "" if v is None else v for k, v in row.items()} for row in loaded.to_list()]  # CSV: "" -> None
        assert as_read == records, name
    assert len(load_records(find_data([str(tmp_path / "saved")]), split="test")) == 1
    with pytest.raises(InputError, match="no split 'validation'"):
        load_records(find_data([str(tmp_path / "saved")]), split="validation")
    with pytest.raises(InputError, match="mix formats"):
        find_data([str(tmp_path / "a.jsonl"), str(tmp_path / "a.csv")])
    with pytest.raises(InputError, match="data not found"):
        find_data([str(tmp_path / "missing.jsonl")])
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported data file type .txt"):
        find_data([str(tmp_path / "a.txt")])
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(InputError, match=r"the record is not valid JSON.*broken.jsonl, line 2\)"):
        load_records(find_data([str(tmp_path / "broken.jsonl")]))


def test_data_hash_is_the_file_hash_or_a_hash_of_the_list(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", alpaca_records(2))
    two = write_jsonl(tmp_path / "two.jsonl", alpaca_records(3))
    digest_one = hashlib.sha256(one.read_bytes()).hexdigest()
    digest_two = hashlib.sha256(two.read_bytes()).hexdigest()
    assert find_data([str(one)]).sha256(FileHasher()) == digest_one
    expected = hashlib.sha256(f"{digest_one}  one.jsonl\n{digest_two}  two.jsonl\n".encode()).hexdigest()
    assert find_data([str(one), str(two)]).sha256(FileHasher()) == expected


def test_eval_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    import datasets

    records = datasets.Dataset.from_list([{"text": f"example {i}"} for i in range(20)])
    data = tokenize_dataset(records, tokenizer, data_format="text", template=None, seq_len=32, train_on_prompt=False,
                            fingerprint="eval-split-test", where="x")
    train, held = split_for_eval(data, 0.2, seed=1)
    again_train, again_held = split_for_eval(data, 0.2, seed=1)
    assert len(held) == 4 and len(train) == 16
    assert held["input_ids"] == again_held["input_ids"] and train["input_ids"] == again_train["input_ids"]
    assert not {tuple(x) for x in held["input_ids"]} & {tuple(x) for x in train["input_ids"]}


@pytest.mark.parametrize(("content", "message"), [
    ("", "the data file holds no records ({path})"),
    ("\n\n", "the data file holds no records ({path})"),
    ('{"text": "a"}\n{"text": \n', "the record is not valid JSON: expecting value ({path}, line 2)"),
])
def test_a_data_error_is_one_line_before_anything_else(tiny_llama, tmp_path, run_cli, content, message):
    """No resolved config ahead of it, no library exception name: the file, its 1-based line, what is wrong."""
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    result = run_cli("train", "--base", tiny_llama, "--data", data, "--out", tmp_path / "out", "--max-steps", 1,
                     expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(path=data)), result.output
    assert not (tmp_path / "out").exists()
