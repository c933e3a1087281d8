"""The demo's models in llama.cpp: exported by ``mtool export gguf``, asked the demo's questions by llama.cpp itself.

    .venv/bin/python benchmarks/export_demo_accuracy.py [--demo DIR] [--types q8_0] [--seed 0]

Runs ``mtool demo`` into benchmarks/_work/demo (unless ``--demo`` names an earlier demo's folder), exports each of its
fine-tunes, merges and the combined adapter (merged into the base by the export) to GGUF, and asks llama.cpp
(llama-cpp-python) every question of every task through the chat template stored in the GGUF file
(``create_chat_completion``: greedy, stopped at the end-of-turn marker), as an application on llama.cpp would.
The answers are scored by exact match (``mtool.evaluate.scoring.is_right``, as ``mtool eval`` scores them) beside
the same models' greedy answers in transformers (``mtool.evaluate``: the chat template, float32). Needs
llama-cpp-python (``MTOOL_LLAMA_CPP=1 bash scripts/setup.sh``). Prints a markdown table: accuracy per task in
transformers and in llama.cpp, and how many of the answers are the same text.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / "benchmarks" / "_work" / "demo-export"
END_OF_TURN = "<|end|>"  # the tiny models' chat template closes every turn with it
MAX_NEW_TOKENS = 6  # the demo's answers are a word or two


def transformers_answers(folder: Path, base: Path, questions: list[str]) -> list[str]:
    """The greedy answer of the model (or adapter on ``base``) in ``folder`` to each question, in transformers."""
    import torch

    from mtool.evaluate.generate import greedy_answers, prompt_ids, stop_rule
    from mtool.evaluate.models import load_model

    device = torch.device("cpu")
    loaded = load_model(str(folder), base=str(base), device=device, dtype=torch.float32)
    prompts = [prompt_ids(loaded.tokenizer, [{"role": "user", "content": question}], chat=True)
               for question in questions]
    stop = stop_rule(loaded.tokenizer, loaded.model, chat=True)
    return greedy_answers(loaded.model, loaded.tokenizer, prompts, stop=stop, max_new_tokens=MAX_NEW_TOKENS,
                          batch_size=64, device=device)


def exact_match(answers: list[str], expected: list[str]) -> float:
    from mtool.evaluate.scoring import is_right

    return sum(is_right(answer, [right]) for answer, right in zip(answers, expected, strict=True)) / len(expected)


def llama_answers(gguf_file: Path, questions: list[str]) -> list[str]:
    """llama.cpp's greedy answer to each question, through the chat template in the file."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, verbose=False, n_threads=2)
    try:
        answers = []
        for question in questions:
            reply = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0,
                                               top_k=1, repeat_penalty=1.0, max_tokens=MAX_NEW_TOKENS,
                                               stop=[END_OF_TURN])
            answers.append(reply["choices"][0]["message"]["content"].split(END_OF_TURN)[0].strip())
        return answers
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="an earlier `mtool demo` folder (default: run the demo)")
    parser.add_argument("--types", default="q8_0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import llama_cpp

    from mtool.demo.pipeline import DemoSettings, run_demo
    from mtool.demo.tasks import all_tasks, skill_tasks
    from mtool.export.gguf_export import GGUFExportOptions, export_gguf

    @llama_cpp.llama_log_callback
    def silent(level, text, user_data):
        return None

    llama_cpp.llama_log_set(silent, ctypes.c_void_p(0))
    started = time.perf_counter()
    demo = args.demo or WORK / "demo"
    if args.demo is None:
        run_demo(demo, DemoSettings().with_seed(args.seed), force=True)
    results = json.loads((demo / "results.json").read_text())
    settings = results.get("settings", {})
    tasks = all_tasks(skill_tasks(settings.get("facts_per_skill")))
    types = [t.strip() for t in args.types.split(",")]
    lines = ["| model | type | " + " | ".join(f"{t.name} transformers / llama.cpp" for t in tasks)
             + " | same answers |", "|---|---|" + "---:|" * len(tasks) + "---:|"]
    for row in results["rows"]:
        if row["kind"] == "base":
            continue
        folder = demo / row["folder"]
        out = WORK / f"{row['folder']}-GGUF"
        export_gguf(str(folder), out, GGUFExportOptions(types=tuple(types), force=True,
                                                        base=str(demo / "base") if row["kind"] == "adapters" else None))
        reference = {task.name: transformers_answers(folder, demo / "base", task.questions) for task in tasks}
        for type_name in types:
            (gguf_file,) = out.glob(f"*-{type_name.upper()}.gguf")
            cells, same, total = [], 0, 0
            for task in tasks:
                answers = llama_answers(gguf_file, task.questions)
                cells.append(f"{exact_match(reference[task.name], task.answers):.0%} / "
                             f"{exact_match(answers, task.answers):.0%}")
                same += sum(a == b for a, b in zip(answers, reference[task.name], strict=True))
                total += len(answers)
            lines.append(f"| {row['label']} (`{row['name']}`) | {type_name.upper()} | " + " | ".join(cells)
                         + f" | {same}/{total} |")
    print("\n".join(lines))
    print(f"\n({time.perf_counter() - started:.0f} s, demo included)", file=sys.stderr)


if __name__ == "__main__":
    main()
