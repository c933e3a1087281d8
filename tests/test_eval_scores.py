"""`mtool eval`'s numbers against references computed here: perplexity against a direct transformers forward pass
in float64 (response tokens only for chats), exact match against a hand-run greedy loop, multiple choice against
hand-computed log-likelihoods, batched generation against one prompt at a time, and the lm-eval bridge against
lm-evaluation-harness itself on a local task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtool.evaluate.examples import read_data
from mtool.evaluate.generate import StopRule, greedy_answers, prompt_ids, stop_rule
from mtool.evaluate.models import load_model
from mtool.evaluate.run import prepare_tasks, score_model
from mtool.evaluate.spec import EvalSpec, ExactMatchTask, MultipleChoiceTask, PerplexityTask
from mtool.io.hashing import FileHasher
from tests.support.train_helpers import write_jsonl

CPU = torch.device("cpu")
END = "<|end|>"
QUESTIONS = ["What is the capital of France?", "Reverse the string: abc", "Question: what is two plus two?",
             "Capital of Japan?", "A model merge combines weights; an adapter adds a low-rank update. Summarize.",
             "0 1 2 3 4 5 6 7 8 9 10 11 12", "Hello", "Instruction: summarize the text. Response:"]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(str(tiny_llama), base=None, device=CPU, dtype=torch.float32)


def _scores(loaded, task, *, batch_size: int = 4, samples: bool = True):
    spec = EvalSpec(tasks=[task], batch_size=batch_size)
    hasher = FileHasher.default()
    (result,) = score_model(loaded, prepare_tasks(spec, hasher), spec, hasher=hasher, samples=samples)
    return result


def _reference_loss(model, pieces: list[list[tuple[str, bool]]], tokenizer) -> tuple[float, int]:
    """Sum of -log p over the trained tokens, and their count: each example is a list of (text, trained) pieces
    tokenized separately, EOS appended (trained when the last piece is), one unpadded forward pass in float64."""
    total, count = 0.0, 0
    for example in pieces:
        ids, trained = [], []
        for text, is_trained in example:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [is_trained] * len(piece)
        ids.append(tokenizer.eos_token_id)
        trained.append(example[-1][1])
        with torch.no_grad():
            logits = model.double()(torch.tensor([ids])).logits[0]
        model.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(1, len(ids)):
            if trained[position]:
                total -= float(log_probs[position - 1, ids[position]])
                count += 1
    return total, count


def test_perplexity_of_chats_equals_a_direct_computation_on_the_responses(loaded, tmp_path: Path) -> None:
    conversations = [
        [("What is the capital of France?", "Paris.")],
        [("Capital of Japan?", "Tokyo"), ("Reverse the string: abc", "cba")],  # two assistant turns
        [("Question: what is two plus two? Answer with one word, please.", "four")],
    ]
    records = [{"messages": [m for q, a in turns for m in ({"role": "user", "content": q},
                                                           {"role": "assistant", "content": a})]}
               for turns in conversations]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    result = _scores(loaded, PerplexityTask(name="chat", data=[str(data)]), batch_size=2)  # padding in play
    # the tiny template: <|role|>\n content <|end|>\n per message, <|assistant|>\n as the generation prompt
    pieces = [[piece for q, a in turns for piece in ((f"<|user|>\n{q}{END}\n<|assistant|>\n", False),
                                                      (f"{a}{END}\n", True))] for turns in conversations]
    total, count = _reference_loss(loaded.model, pieces, loaded.tokenizer)
    assert result.metrics["tokens"] == count
    assert result.metrics["mean_token_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.metric == "perplexity" and not result.higher_is_better
    assert result.score == pytest.approx(-total / count, rel=1e-5)  # a search maximizes minus the loss


def test_perplexity_of_text_counts_every_token(loaded, tmp_path: Path) -> None:
    texts = ["The capital of France is Paris.", "A model merge combines weights.", "abc -> cba", "Hello there, mtool!"]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in texts])
    result = _scores(loaded, PerplexityTask(name="text", data=[str(data)]), batch_size=3)
    total, count = _reference_loss(loaded.model, [[(text, True)] for text in texts], loaded.tokenizer)
    assert result.metrics["tokens"] == count
    assert result.metrics["mean_token_loss"] == pytest.approx(total / count, rel=1e-5)


def _hand_greedy(model, tokenizer, ids: list[int], stops: set[int], max_new_tokens: int) -> str:
    """Greedy decoding by hand: the argmax of a full forward pass at each step, until a stop token."""
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + generated])).logits[0, -1].argmax())
            if token in stops:
                break
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_exact_match_equals_a_hand_computed_reference(loaded, tmp_path: Path) -> None:
    tokenizer, model = loaded.tokenizer, loaded.model
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END),
             tokenizer.convert_tokens_to_ids("<|assistant|>")}
    references = []
    for question in QUESTIONS[:5]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        references.append(_hand_greedy(model, tokenizer, list(ids), stops, max_new_tokens=5))
    assert len(set(references)) > 1  # the model says different things to different questions
    truths = [references[0], "not this", references[2], "nor this", references[4]]
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": t} for q, t in zip(QUESTIONS, truths)])
    result = _scores(loaded, ExactMatchTask(name="qa", data=[str(data)], max_new_tokens=5))
    assert [sample["answer"] for sample in result.samples] == references
    assert result.value == pytest.approx(3 / 5) and result.metrics["right"] == 3
    assert result.settings["chat"] is True and result.settings["stop"] == []


def test_batched_greedy_answers_are_the_unbatched_ones(loaded) -> None:
    tokenizer, model = loaded.tokenizer, loaded.model
    for chat, strings in ((True, ()), (False, ("\n",)), (False, ("e", "o"))):  # rows stop at different steps
        prompts = [prompt_ids(tokenizer, question, chat=chat) for question in QUESTIONS]
        assert len({len(p) for p in prompts}) > 4  # left padding of very different lengths
        stop = stop_rule(tokenizer, model, chat=chat, strings=strings)
        alone = greedy_answers(model, tokenizer, prompts, stop=stop, max_new_tokens=12, batch_size=1, device=CPU)
        for batch_size in (3, 8):
            assert greedy_answers(model, tokenizer, prompts, stop=stop, max_new_tokens=12, batch_size=batch_size,
                                  device=CPU) == alone


def test_the_stop_rule_cuts_at_stop_tokens_and_strings(loaded) -> None:
    tokenizer, model = loaded.tokenizer, loaded.model
    rule = stop_rule(tokenizer, model, chat=True, strings=["\n"])
    assert tokenizer.eos_token_id in rule.token_ids and tokenizer.convert_tokens_to_ids(END) in rule.token_ids
    ids = tokenizer(f" Paris{END}Rome", add_special_tokens=False)["input_ids"]
    assert rule.cut(tokenizer, ids) == "Paris"
    assert rule.cut(tokenizer, tokenizer(" Paris\nRome", add_special_tokens=False)["input_ids"]) == "Paris"
    assert StopRule(rule.token_ids).cut(tokenizer, tokenizer("a b\nc")["input_ids"]) == "a b\nc"
    plain = stop_rule(tokenizer, model, chat=False)
    assert tokenizer.convert_tokens_to_ids(END) not in plain.token_ids  # template markers stop chat prompts only


def test_multiple_choice_equals_hand_computed_loglikelihoods(loaded, tmp_path: Path) -> None:
    tokenizer, model = loaded.tokenizer, loaded.model
    examples = [("What is the capital of France?", ["Paris", "Rome", "Oslo"], 0),
                ("Reverse the string: abc", ["cba", "abc", "bca and more"], 2),
                ("Question: what is two plus two? Answer:", ["four", "five", "two plus two"], "four"),
                ("Capital of Japan?", ["Tokyo", "Kyoto"], 1)]
    records = [{"question": q, "choices": c, "answer": a} for q, c, a in examples]
    data = write_jsonl(tmp_path / "mc.jsonl", records)
    result = _scores(loaded, MultipleChoiceTask(name="mc", data=[str(data)], chat=False), batch_size=5)
    right = right_norm = 0
    for (question, choices, answer), sample in zip(examples, result.samples):
        context = tokenizer(question)["input_ids"]
        reference = []
        for choice in choices:
            continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model.double()(torch.tensor([context + continuation])).logits[0]
            model.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            reference.append(sum(float(log_probs[len(context) + j - 1, token]) for j, token in enumerate(continuation)))
        assert sample["loglikelihoods"] == pytest.approx(reference, rel=1e-5)
        index = answer if isinstance(answer, int) else choices.index(answer)
        right += max(range(len(choices)), key=lambda j: reference[j]) == index
        right_norm += max(range(len(choices)), key=lambda j: reference[j] / len(choices[j])) == index
    assert result.metrics["accuracy"] == right / len(examples)
    assert result.metrics["accuracy_norm"] == right_norm / len(examples)


def test_the_lm_eval_bridge_runs_a_local_task_as_the_harness_does(tiny_llama, tmp_path: Path, run_cli) -> None:
    from mtool.evaluate.harness import harness_available

    if not harness_available():
        pytest.skip("lm-eval is not installed: `pip install 'mtool[harness]'` runs this test")
    records = [{"question": q, "choices": c, "answer": a} for q, c, a in (
        ("What is the capital of France?", ["Paris", "Rome", "Oslo"], 0),
        ("What is the capital of Italy?", ["Paris", "Rome", "Oslo"], 1),
        ("Reverse the string: abc", ["cba", "abc"], 0),
        ("What is two plus two?", ["four", "five", "six"], 2))]
    data = write_jsonl(tmp_path / "mc.jsonl", records)
    task_file = tmp_path / "tasks" / "tiny_mc.yaml"
    task_file.parent.mkdir()
    task_file.write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")
    output = run_cli("-q", "eval", tiny_llama, "--lm-eval", task_file, "--data", data, "--task", "multiple_choice",
                     "--no-chat", "--json", "--no-record").stdout
    tasks = {task["task"]: task for task in json.loads(output)[0]["tasks"]}
    harness, own = tasks["tiny_mc"], tasks["mc"]
    assert harness["kind"] == "lm_eval" and harness["metric"] == "acc" and harness["higher_is_better"]
    assert harness["data"]["examples"] == 4 and len(harness["data"]["sha256"]) == 64
    assert harness["value"] == own["metrics"]["accuracy"]  # the harness and mtool score the same choices
    assert not (tiny_llama / "mtool-lineage.json").exists()


def test_read_data_counts_hashes_and_limits(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": "x"} for q in QUESTIONS])
    hasher = FileHasher.default()
    full, limited = read_data([str(data)], hasher=hasher), read_data([str(data)], hasher=hasher, limit=3)
    assert full.dataset.examples == len(QUESTIONS) and limited.dataset.examples == 3
    assert full.dataset.sha256 == hasher.sha256(data)
