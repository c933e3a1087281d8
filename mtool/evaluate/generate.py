"""Prompts as token ids, and batched greedy generation with a stop rule.

Greedy decoding is transformers' ``generate`` with ``do_sample=False`` and the model's own generation defaults
(sampling, repetition penalties, forced tokens) set aside, so that every model is scored by the same rule:
the most likely token at each step. Prompts are batched longest first and padded on the left, so each row's
tokens sit where they would sit alone (position ids follow the attention mask): a batch gives the answers
the prompts give one at a time.

The stop rule: generation of a row ends at the end-of-sequence token, at any end-of-sequence id of the model's
generation config, at the chat template's turn markers (``<|end|>``, ``<|im_end|>``, ``<|eot_id|>``... when
they are single tokens), at a stop string, or after ``max_new_tokens``; the answer is the text before the
first stop token or stop string, with surrounding whitespace removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtool.evaluate.examples import Prompt
from mtool.train.formats import ChatRenderer, template_markers

if TYPE_CHECKING:
    import torch


def use_chat(tokenizer: Any, chat: bool | None, prompts: Sequence[Prompt]) -> bool:
    """Whether prompts go through the chat template: as asked, else when the tokenizer has one; conversations
    always do."""
    if chat is None:
        chat = tokenizer.chat_template is not None
    return chat or any(isinstance(prompt, list) for prompt in prompts)


def prompt_ids(tokenizer: Any, prompt: Prompt, *, chat: bool, system: str | None = None) -> list[int]:
    """The token ids a prompt is given as: a user turn of the chat template followed by the assistant's
    generation prompt, or the plain text (with the tokenizer's special tokens, e.g. BOS)."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    text = ChatRenderer(tokenizer, tokenizer.chat_template).render(messages, generation_prompt=True)
    bos = tokenizer.bos_token
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


@dataclass(frozen=True)
class StopRule:
    token_ids: tuple[int, ...]  # generation of a row ends at any of these
    strings: tuple[str, ...] = ()  # the answer ends before the first of these

    def cut(self, tokenizer: Any, generated: Sequence[int]) -> str:
        """The answer in ``generated``: up to the first stop token, decoded, up to the first stop string."""
        stops = set(self.token_ids)
        end = next((index for index, token in enumerate(generated) if token in stops), len(generated))
        text = tokenizer.decode(list(generated[:end]), skip_special_tokens=True)
        for string in self.strings:
            text = text.split(string, 1)[0]
        return text.strip()


def stop_rule(tokenizer: Any, model: Any, *, chat: bool, strings: Sequence[str] = ()) -> StopRule:
    """The stop tokens of ``tokenizer`` and ``model`` (see the module docstring) and the stop ``strings``."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [configured] if isinstance(configured, int) else list(configured or [])
    if chat and tokenizer.chat_template:
        vocabulary = tokenizer.get_vocab()
        ids += [vocabulary[marker] for marker in template_markers(tokenizer.chat_template) if marker in vocabulary]
    return StopRule(tuple(dict.fromkeys(ids)), tuple(s for s in strings if s))


@contextlib.contextmanager
def _plain_generation_config(model: Any, pad_id: int, stop: StopRule, max_new_tokens: int) -> Iterator[Any]:
    """The model with a neutral generation config (greedy, no penalties or forced tokens) while generating."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(do_sample=False, num_beams=1, eos_token_id=list(stop.token_ids),
                                               pad_token_id=pad_id, max_new_tokens=max_new_tokens,
                                               stop_strings=list(stop.strings) or None)
    try:
        yield inner.generation_config
    finally:
        inner.generation_config = saved


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``rows`` as one batch padded on the left: ``(input_ids, attention_mask)``."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row):] = torch.tensor(list(row))
            attention_mask[index, width - len(row):] = 1
    return input_ids, attention_mask


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, stop: StopRule,
                   max_new_tokens: int, batch_size: int, device: "torch.device",
                   advance: Callable[[int], object] = lambda count: None) -> list[str]:
    """The greedy answer to each prompt (token ids), in order; ``advance(n)`` is called as n prompts finish."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop.token_ids[0]
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))  # longest first: memory peaks early
    answers: list[str] = [""] * len(prompts)
    with _plain_generation_config(model, pad_id, stop, max_new_tokens) as config, torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start: start + batch_size]
            input_ids, attention_mask = left_padded([prompts[index] for index in chosen], pad_id)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config, tokenizer=tokenizer if stop.strings else None)
            for row, index in enumerate(chosen):
                answers[index] = stop.cut(tokenizer, output[row, input_ids.shape[1]:].tolist())
            advance(len(chosen))
    return answers
