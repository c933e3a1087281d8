"""``mtool eval`` from start to finish: the spec's data read once, then each model loaded (after the memory
check), scored on every task, released, and its results added to its lineage record and card."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtool import ui
from mtool.evaluate.examples import EvalData, PromptExample, exact_match_examples, multiple_choice_examples, read_data
from mtool.evaluate.models import LoadedModel, load_model, resolve_device, resolve_dtype
from mtool.evaluate.results import ModelResult, TaskResult
from mtool.evaluate.spec import EvalSpec, ExactMatchTask, HarnessTask, MultipleChoiceTask, PerplexityTask, Task
from mtool.hub import ModelRef
from mtool.io.hashing import FileHasher


@dataclass(frozen=True)
class EvalOptions:
    base: str | None = None  # the base adapters are evaluated on (default: the one their config names)
    record: bool = True  # add the results to each evaluated folder's lineage record and card
    samples: bool = False  # keep every example's prompt, answer and verdict in the results


@dataclass
class PreparedTask:
    """A task with its data read (and its examples parsed, for prompt tasks)."""

    task: Task
    data: EvalData | None = None  # None for an lm-eval task (the harness reads its own data)
    examples: list[PromptExample] = field(default_factory=list)


def prepare_tasks(spec: EvalSpec, hasher: FileHasher) -> list[PreparedTask]:
    """Read every task's data once (for all the models evaluated on it)."""
    prepared = []
    for task in spec.tasks:
        if isinstance(task, HarnessTask):
            prepared.append(PreparedTask(task))
            continue
        data = read_data(task.data, hasher=hasher, limit=task.limit, key=f"{task.name}: data")
        examples: list[PromptExample] = []
        if isinstance(task, ExactMatchTask):
            examples = exact_match_examples(data)
        elif isinstance(task, MultipleChoiceTask):
            examples = multiple_choice_examples(data)
        prepared.append(PreparedTask(task, data, examples))
    return prepared


def _settings(spec: EvalSpec, loaded: LoadedModel, **extra: Any) -> dict[str, Any]:
    return {"batch_size": spec.batch_size, "dtype": str(loaded.dtype).removeprefix("torch."),
            "device": loaded.device.type, **extra}


def _exact_match(loaded: LoadedModel, prepared: PreparedTask, spec: EvalSpec, samples: bool,
                 advance) -> TaskResult:
    from mtool.evaluate.generate import greedy_answers, prompt_ids, stop_rule, use_chat
    from mtool.evaluate.scoring import is_right

    task: ExactMatchTask = prepared.task  # type: ignore[assignment]
    prompts = [example.prompt for example in prepared.examples]
    chat = use_chat(loaded.tokenizer, task.chat, prompts)
    strings = task.stop if task.stop is not None else ([] if chat else ["\n"])
    stop = stop_rule(loaded.tokenizer, loaded.model, chat=chat, strings=strings)
    ids = [prompt_ids(loaded.tokenizer, prompt, chat=chat, system=task.system) for prompt in prompts]
    answers = greedy_answers(loaded.model, loaded.tokenizer, ids, stop=stop, max_new_tokens=task.max_new_tokens,
                             batch_size=spec.batch_size, device=loaded.device, advance=advance)
    right = [is_right(answer, example.answers, ignore_case=task.ignore_case)
             for answer, example in zip(answers, prepared.examples)]
    accuracy = sum(right) / len(right)
    return TaskResult(
        task=task.name, kind=task.kind, metric="accuracy", value=accuracy, higher_is_better=True, score=accuracy,
        metrics={"accuracy": accuracy, "right": float(sum(right))}, dataset=prepared.data.dataset,
        settings=_settings(spec, loaded, chat=chat, max_new_tokens=task.max_new_tokens, stop=list(strings),
                           ignore_case=task.ignore_case),
        samples=[{"prompt": example.prompt, "answer": answer, "accepted": list(example.answers), "right": ok}
                 for example, answer, ok in zip(prepared.examples, answers, right)] if samples else [])


def _multiple_choice(loaded: LoadedModel, prepared: PreparedTask, spec: EvalSpec, samples: bool,
                     advance) -> TaskResult:
    from mtool.evaluate.generate import prompt_ids, use_chat
    from mtool.evaluate.scoring import choice_accuracy, continuation_ids, loglikelihoods

    task: MultipleChoiceTask = prepared.task  # type: ignore[assignment]
    tokenizer = loaded.tokenizer
    chat = use_chat(tokenizer, task.chat, [example.prompt for example in prepared.examples])
    delimiter = task.delimiter if task.delimiter is not None else ("" if chat else " ")
    requests, owners = [], []
    for index, example in enumerate(prepared.examples):
        context = prompt_ids(tokenizer, example.prompt, chat=chat, system=task.system)
        for choice in example.choices:
            requests.append((context, continuation_ids(tokenizer, delimiter + choice)))
            owners.append(index)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = loglikelihoods(loaded.model, requests, pad_id=pad_id, batch_size=spec.batch_size, device=loaded.device,
                            advance=advance)
    grouped: list[list[float]] = [[] for _ in prepared.examples]
    for owner, score in zip(owners, scores):
        grouped[owner].append(score)
    metrics = choice_accuracy(prepared.examples, grouped)
    return TaskResult(
        task=task.name, kind=task.kind, metric="accuracy", value=metrics["accuracy"], higher_is_better=True,
        score=metrics["accuracy"], metrics=metrics, dataset=prepared.data.dataset,
        settings=_settings(spec, loaded, chat=chat, delimiter=delimiter),
        samples=[{"prompt": example.prompt, "choices": list(example.choices), "answer": example.answers[0],
                  "loglikelihoods": choice_scores} for example, choice_scores in zip(prepared.examples, grouped)]
        if samples else [])


def _perplexity(loaded: LoadedModel, prepared: PreparedTask, spec: EvalSpec, advance) -> TaskResult:
    from mtool.evaluate.loss import mean_token_loss

    task: PerplexityTask = prepared.task  # type: ignore[assignment]
    result = mean_token_loss(loaded.model, loaded.tokenizer, prepared.data, task, batch_size=spec.batch_size,
                             device=loaded.device, advance=advance)
    dataset = prepared.data.dataset.model_copy(update={"format": result.data_format})
    return TaskResult(
        task=task.name, kind=task.kind, metric="perplexity", value=result.perplexity, higher_is_better=False,
        score=-result.mean_token_loss, dataset=dataset,
        metrics={"perplexity": result.perplexity, "mean_token_loss": result.mean_token_loss,
                 "tokens": float(result.tokens), "examples": float(result.examples)},
        settings=_settings(spec, loaded, seq_len=task.seq_len, train_on_prompt=task.train_on_prompt,
                           chat_template=task.chat_template))


def score_model(loaded: LoadedModel, tasks: Sequence[PreparedTask], spec: EvalSpec, *, hasher: FileHasher,
                samples: bool = False) -> list[TaskResult]:
    """Every task's result for the loaded model, with a progress bar per task."""
    from mtool.evaluate.harness import run_harness_task

    results = []
    for prepared in tasks:
        task = prepared.task
        if isinstance(task, HarnessTask):
            ui.info(f"  {task.name}: lm-eval task {task.task}")
            results.append(run_harness_task(loaded, task, batch_size=spec.batch_size, hasher=hasher))
            continue
        if isinstance(task, MultipleChoiceTask):
            total, unit = sum(len(example.choices) for example in prepared.examples), "choice"
        else:
            total, unit = len(prepared.examples) or len(prepared.data.records), "ex"
        with ui.progress(total=total, desc=f"  {task.name}", unit=unit) as bar:
            if isinstance(task, ExactMatchTask):
                results.append(_exact_match(loaded, prepared, spec, samples, bar.update))
            elif isinstance(task, MultipleChoiceTask):
                results.append(_multiple_choice(loaded, prepared, spec, samples, bar.update))
            else:
                results.append(_perplexity(loaded, prepared, spec, bar.update))
    return results


@dataclass(frozen=True)
class Scored:
    """What scoring a model left: where it came from and every task's result (the model itself is gone)."""

    label: str
    ref: ModelRef
    base: ModelRef | None
    results: list[TaskResult]


def load_and_score(reference: str, tasks: Sequence[PreparedTask], spec: EvalSpec, *, base: str | None,
                   hasher: FileHasher, samples: bool = False) -> Scored:
    """Load ``reference`` (after the memory check), score it on ``tasks`` and give its memory back before
    returning: the model is dropped, and collected at once if reference cycles still hold it."""
    import torch

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    loaded = load_model(reference, base=base, device=device, dtype=dtype)
    label, ref, base_ref = loaded.label, loaded.ref, loaded.base
    ui.info(f"{label} ({str(dtype).removeprefix('torch.')} on {device})")
    alive = weakref.ref(loaded.model)
    try:
        results = score_model(loaded, tasks, spec, hasher=hasher, samples=samples)
    finally:
        del loaded
        if alive() is not None:
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return Scored(label, ref, base_ref, results)


def evaluate_models(references: Sequence[str], spec: EvalSpec, options: EvalOptions = EvalOptions(), *,
                    hasher: FileHasher | None = None) -> list[ModelResult]:
    """Evaluate each model (or adapter) of ``references`` on every task of ``spec``; with ``options.record``,
    add the results to each local folder's lineage record and card."""
    from mtool.evaluate.record import record_results

    hasher = hasher or FileHasher.default()
    tasks = prepare_tasks(spec, hasher)
    results = []
    for reference in references:
        started = time.perf_counter()
        scored = load_and_score(reference, tasks, spec, base=options.base, hasher=hasher, samples=options.samples)
        label, ref, base, scores = scored.label, scored.ref, scored.base, scored.results
        folder = None if ref.is_hub else Path(ref.path)
        result = ModelResult(label, folder, base.id if base else None, scores, time.perf_counter() - started)
        if options.record:
            result.recorded = record_results(ref, scores, base=result.base)
        results.append(result)
    return results
