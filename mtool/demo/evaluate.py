"""Exact-match accuracy: greedy answers to a task's chat questions, compared with the truth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtool.demo.tasks import Task

END_OF_TURN = "<|end|>"


def load_for_eval(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """A full model folder, or a PEFT adapter folder on top of ``base`` (float32, eval mode), and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        if base is None:
            raise ValueError(f"{folder} is an adapter: give its base model")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
        tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else Path(base)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer_folder = folder
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_folder)


def greedy_answers(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int = 6) -> list[str]:
    """The model's greedy answer to each question (one chat turn), cut at the end-of-turn marker."""
    import torch

    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    answers = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=False)
        answers.append(text.split(END_OF_TURN)[0].replace(tokenizer.eos_token, "").strip())
    return answers


def exact_match(predictions: list[str], truths: list[str]) -> float:
    """Fraction of predictions equal to their truth."""
    return sum(p == t for p, t in zip(predictions, truths, strict=True)) / len(truths)


def accuracy(model: Any, tokenizer: Any, task: Task) -> float:
    """Exact-match accuracy of ``model`` on ``task``."""
    return exact_match(greedy_answers(model, tokenizer, task.questions), task.answers)
