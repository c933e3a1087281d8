"""``mtool eval MODEL... --data FILE``: score models (or adapters on their base) on local data."""

from __future__ import annotations

import json

import click


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, required=True)
@click.option("--data", "data", multiple=True, type=click.Path(exists=True),
              help="A data file (JSONL, JSON, Parquet, CSV) or folder: one task each. Repeatable.")
@click.option("--task", "kind", type=click.Choice(["perplexity", "exact_match", "multiple_choice"]),
              help="What --data is scored by (default: from its columns).")
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False),
              help="An evaluation spec (YAML: tasks and settings), instead of --data.")
@click.option("--lm-eval", "harness", multiple=True,
              help="An lm-evaluation-harness task: its YAML file (with local data files) or its name. Repeatable.")
@click.option("--base", help="The base model adapters are evaluated on (default: the one their config names).")
@click.option("--limit", type=click.IntRange(min=1), help="Score the first N examples of each task only.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Exact match: longest answer, in tokens (32).")
@click.option("--stop", multiple=True, help="Exact match: a stop string (repeatable; default: a newline for "
                                            "plain prompts, none for chat prompts).")
@click.option("--chat/--no-chat", default=None, help="Prompts through the chat template (default: when the "
                                                     "tokenizer has one).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Examples per forward pass (16).")
@click.option("--device", help="auto (a GPU when there is one), cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="auto: bfloat16 on a GPU, float32 on CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--chart", type=click.Path(dir_okay=False), help="Write a chart of the results (PNG).")
@click.option("--samples", type=click.Path(dir_okay=False),
              help="Write every example's prompt, answer and verdict (JSON Lines).")
@click.option("--no-record", is_flag=True, help="Do not add the results to the models' lineage records and cards.")
def evaluate(models: tuple[str, ...], data: tuple[str, ...], kind: str | None, spec_file: str | None,
             harness: tuple[str, ...], base: str | None, limit: int | None, max_new_tokens: int | None,
             stop: tuple[str, ...], chat: bool | None, batch_size: int | None, device: str | None, dtype: str | None,
             as_json: bool, chart: str | None, samples: str | None, no_record: bool) -> None:
    """Evaluate MODELS (folders or Hub ids; adapters on their base) on local data.

    \b
    perplexity       mean token loss and perplexity, as training computes its loss (responses only in chats)
    exact_match      greedy answers to `prompt` (or `messages`), compared with `answer`
    multiple_choice  the most likely of `choices`, compared with `answer` (index or text)
    --lm-eval        a task of lm-evaluation-harness on the same loaded model (pip install 'mtool[harness]')

    Prints a table (or --json), writes --chart and --samples, and adds the results to each model's
    mtool-lineage.json and card (its model-index), unless --no-record. Every option is in docs/eval.md.
    """
    from mtool.evaluate.results import as_json as results_as_json
    from mtool.evaluate.results import text_table, write_chart
    from mtool.evaluate.run import EvalOptions, evaluate_models
    from mtool.evaluate.spec import build_spec

    spec = build_spec(spec_file=spec_file, data=list(data), kind=kind, harness=list(harness),
                      task_settings={"limit": limit, "max_new_tokens": max_new_tokens, "stop": list(stop) or None,
                                     "chat": chat},
                      run_settings={"batch_size": batch_size, "device": device, "dtype": dtype})
    results = evaluate_models(list(models), spec, EvalOptions(base=base, record=not no_record, samples=bool(samples)))
    if as_json:
        click.echo(json.dumps(results_as_json(results), indent=2))
    else:
        click.echo(text_table(results))
    if chart:
        write_chart(chart, results)
    if samples:
        with open(samples, "w", encoding="utf-8") as handle:
            for row in results_as_json(results, samples=True):
                for task in row["tasks"]:
                    for sample in task.get("samples", []):
                        handle.write(json.dumps({"model": row["model"], "task": task["task"], **sample}) + "\n")
