"""Scoring prompt tasks: exact match of greedy answers, and multiple choice by log-likelihood.

Exact match: an answer is right when it equals one of the accepted answers, both with surrounding whitespace
removed (and case folded with ``ignore_case``); accuracy is the fraction of right answers.

Multiple choice: each choice ``c`` continues the prompt's token ids ``x`` with the tokens ``y`` of
``delimiter + c``, and is scored by its log-likelihood under the model::

    loglik(c) = sum_j log p(y_j | x, y_<j)

``accuracy`` counts the examples whose right choice has the highest log-likelihood, ``accuracy_norm`` those
whose right choice has the highest log-likelihood per character of the choice (long choices are not
penalized for their length); ties go to the first choice, as in lm-evaluation-harness.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mtool.evaluate.examples import PromptExample
from mtool.evaluate.generate import left_padded


def is_right(answer: str, accepted: Sequence[str], *, ignore_case: bool = False) -> bool:
    """Whether ``answer`` equals one of ``accepted`` (whitespace stripped; case folded with ``ignore_case``)."""
    def normal(text: str) -> str:
        return text.strip().casefold() if ignore_case else text.strip()

    return normal(answer) in {normal(text) for text in accepted}


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of a choice as it continues a prompt (no special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def loglikelihoods(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
                   batch_size: int, device: Any, advance: Callable[[int], object] = lambda count: None) -> list[float]:
    """``sum_j log p(y_j | x, y_<j)`` for each request ``(x, y)`` (token ids), in order.

    Rows are padded on the left with position ids that follow the attention mask, and only the logits of the last
    ``max len(y) + 1`` positions are computed (``logits_to_keep``), so memory does not grow with the prompts.
    """
    import torch

    order = sorted(range(len(requests)), key=lambda index: -sum(map(len, requests[index])))
    scores = [0.0] * len(requests)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start: start + batch_size]
            rows = [list(requests[index][0]) + list(requests[index][1]) for index in chosen]
            input_ids, attention_mask = left_padded(rows, pad_id)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(len(requests[index][1]) for index in chosen) + 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           position_ids=position_ids.to(device), logits_to_keep=keep, use_cache=False).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for row, index in enumerate(chosen):
                target = torch.tensor(list(requests[index][1]), device=log_probs.device)
                length = len(target)
                predicted = log_probs[row, keep - 1 - length: keep - 1]  # position t predicts token t + 1
                scores[index] = float(predicted.gather(-1, target[:, None]).sum())
            advance(len(chosen))
    return scores


def choice_accuracy(examples: Sequence[PromptExample], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """``accuracy`` and ``accuracy_norm`` (see the module docstring) from each example's choice log-likelihoods."""
    right = right_norm = 0
    for example, choice_scores in zip(examples, scores, strict=True):
        best = max(range(len(choice_scores)), key=lambda j: (choice_scores[j], -j))
        per_char = [score / max(1, len(choice)) for score, choice in zip(choice_scores, example.choices)]
        best_norm = max(range(len(per_char)), key=lambda j: (per_char[j], -j))
        right += best == example.answer_index
        right_norm += best_norm == example.answer_index
    return {"accuracy": right / len(examples), "accuracy_norm": right_norm / len(examples)}
