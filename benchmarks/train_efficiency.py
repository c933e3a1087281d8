"""Training efficiency on CPU, hardware-independent where it can be: mtool beside the usual HF + PEFT recipe.

Usage:

    python benchmarks/train_efficiency.py                     # both parts; prints the markdown tables
    python benchmarks/train_efficiency.py --part memory       # Llama-3.2-1B shape, QLoRA r16
    python benchmarks/train_efficiency.py --part speed        # 135M Llama, LoRA r16, batch 4: step time
    python benchmarks/train_efficiency.py --budget-gib 4 --work-dir /tmp/bench

Part ``memory`` (a random checkpoint of the Llama-3.2-1B shape: hidden 2048, 16 layers, 32/8 heads, MLP 8192,
128,256-token vocabulary, tied embeddings; QLoRA NF4 with double quantization, r=16 on the seven projections,
float32 compute on the CPU, gradient checkpointing in both):

- ``usual``: the usual HF + PEFT recipe: ``prepare_model_for_kbit_training`` (non-reentrant checkpointing),
  ``get_peft_model``, the model's own loss over the full logits;
- ``mtool``: :func:`mtool.train.model.build_model` with mtool's defaults (lean LoRA layers, fused blocks,
  chunked loss) and the loss as the training loop asks for it.

For each, in its own process: FLOPs per token of a forward + backward (``torch.utils.flop_counter``), the
bytes autograd keeps for the backward pass per token (saved-tensor hooks, each storage once, parameters not
counted; :func:`mtool.train.measure.count_saved_tensors`) and the peak resident set of that step; then the
longest sequence (batch 1) whose training step (forward, backward, AdamW update) stays within ``--budget-gib``
of resident memory, found by bisection over probes in fresh processes (a probe is stopped as soon as it goes
over; loading the model is not part of the budget, the step's peak is, weights included).

Part ``speed`` (a 135M-parameter Llama: hidden 576, 30 layers, 9/3 heads, MLP 1536, vocabulary 49,152; LoRA r16
on the seven projections, batch 4 x 128 tokens, float32, gradient checkpointing, the same optimizer): seconds
per optimizer step of mtool's whole training loop (:func:`mtool.train.loop.run_loop`: data from a tokenized
dataset, collation, loss normalization, clipping, schedule, metrics, checkpoint bookkeeping) and of a plain
transformers + PEFT loop over the same batches, alternating, several rounds; medians.

Timings on a shared machine are noisy: compare the ratios of one run, and re-measure the final numbers on a
quiet machine. Every table says which machine it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072, head_dim=64)
LLAMA_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
_PROCESS_SETTINGS = contextlib.ExitStack()  # settings a measuring process keeps until it exits
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# Models


def quantized_checkpoint(source: Path) -> Path:
    """``source`` quantized once to NF4 (double quantization) and saved, so every probe loads in seconds."""
    import shutil

    folder = source.with_name(source.name + "-nf4")
    if (folder / "config.json").is_file():
        return folder
    model = load_quantized(source)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, folder / name)
    return folder


def load_quantized(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                quantization_config=quantization)


def make_checkpoint(folder: Path, shape: dict) -> Path:
    """A random bf16 Llama checkpoint of ``shape`` with a small word-level tokenizer (made once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**shape, rms_norm_eps=1e-5)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(1000)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def usual_model(path: Path, quantized: bool):
    """The usual HF + PEFT recipe (prepare_model_for_kbit_training for QLoRA; its checkpointing either way)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if quantized:
        model = load_quantized(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    return model


def mtool_config(path: Path, quantized: bool, **overrides):
    from mtool.train.config import load_config

    return load_config(None, {"base": str(path), "out": tempfile.mkdtemp(prefix="mtool-efficiency-"),
                              "data.path": ["random"], "model.quantization": "nf4" if quantized else "none",
                              "model.compute_dtype": "float32", "lora.rank": RANK, "lora.alpha": RANK,
                              "lora.target_modules": TARGETS, "training.optimizer": "adamw", "training.lr": 1e-4,
                              "training.warmup_steps": 0, "training.schedule": "constant", **overrides})


def mtool_model(path: Path, quantized: bool):
    import torch

    from mtool.train.model import build_model
    from mtool.train.tokenizer import load_tokenizer

    config = mtool_config(path, quantized)
    model, _ = build_model(str(path), load_tokenizer(str(path)), config.model, config.lora,
                           device=torch.device("cpu"), seed=0)
    return model


def training_step(model, ids, optimizer=None) -> float:
    """Forward (with the loss over every next token, normalized by their count), backward, AdamW update."""
    loss = model(input_ids=ids, labels=ids, num_items_in_batch=ids.shape[0] * (ids.shape[1] - 1),
                 use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss)


def load(stack: str, path: Path, quantized: bool = True):
    """The stack's model, in a process whose resident set follows its live tensors: glibc maps every block of
    1 MiB or more and returns it on free (its default raises that threshold as it goes, which keeps freed
    memory resident depending on the order of earlier allocations, a noise of a few hundred MB per step)."""
    import torch

    from mtool.runtime import RETURN_FREED_MEMORY, allocator_policy

    torch.set_num_threads(os.cpu_count() or 1)
    _PROCESS_SETTINGS.enter_context(allocator_policy(RETURN_FREED_MEMORY))
    return usual_model(path, quantized) if stack == "usual" else mtool_model(path, quantized)


def random_ids(tokens: int, vocab: int, batch: int = 1, seed: int = 0):
    import torch

    return torch.randint(4, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Part 1: memory and FLOPs (each stack in its own process)


def measure(stack: str, path: Path, tokens: int) -> dict:
    """FLOPs, bytes kept for the backward pass and peak RSS of one forward + backward of ``tokens`` tokens."""
    from mtool.train.measure import count_flops, count_saved_tensors, current_rss_bytes, peak_rss_bytes, reset_peak_rss

    model = load(stack, path)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = random_ids(tokens, vocab)
    rss_loaded = current_rss_bytes()
    reset_peak_rss()
    kept = {}

    def step():
        with count_saved_tensors(model) as saved:
            loss = model(input_ids=ids, labels=ids, num_items_in_batch=tokens - 1, use_cache=False).loss
        kept["bytes"] = saved.bytes
        loss.backward()

    started = time.perf_counter()
    flops = count_flops(step)
    seconds = time.perf_counter() - started
    return {"stack": stack, "tokens": tokens, "flops_per_token": flops / tokens,
            "saved_bytes_per_token": kept["bytes"] / tokens, "peak_rss_gib": peak_rss_bytes() / GIB,
            "loaded_rss_gib": rss_loaded / GIB, "step_s": seconds}


def probe(stack: str, path: Path, tokens: int) -> dict:
    """One training step (forward, backward, AdamW update) of a ``tokens``-token sequence; its peak RSS."""
    import torch

    from mtool.train.measure import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    model = load(stack, path)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = random_ids(tokens, model.get_input_embeddings().weight.shape[0])
    current_rss_bytes()  # hands the loading's freed heap back to the system
    print(json.dumps({"loaded": True}), flush=True)  # the parent enforces the budget from here on
    reset_peak_rss()
    started = time.perf_counter()
    loss = training_step(model, ids, optimizer)
    return {"stack": stack, "tokens": tokens, "peak_rss_gib": peak_rss_bytes() / GIB, "loss": loss,
            "step_s": time.perf_counter() - started}


def _child(mode: str, stack: str, path: Path, tokens: int) -> list[str]:
    return [sys.executable, __file__, f"--{mode}", stack, "--model-dir", str(path), "--tokens", str(tokens)]


def run_probe(stack: str, path: Path, tokens: int, budget: int) -> tuple[bool, dict]:
    """Run a probe in a fresh process; stop it once its resident set passes ``budget`` after loading."""
    import threading

    from mtool.train.measure import process_memory_bytes

    process = subprocess.Popen(_child("probe", stack, path, tokens), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    over = False
    while process.poll() is None:
        loaded = any('"loaded"' in line for line in lines)
        if loaded and (process_memory_bytes("VmRSS", process.pid) or 0) > budget:
            over = True
            process.kill()
            break
        time.sleep(0.02)
    process.wait()
    reader.join()
    rows = [json.loads(line) for line in lines if line.startswith("{") and "peak_rss_gib" in line]
    row = rows[-1] if rows else {"stack": stack, "tokens": tokens}
    fits = not over and process.returncode == 0 and bool(rows) and row["peak_rss_gib"] * GIB <= budget
    row["fits"] = fits
    peak = f"{row['peak_rss_gib']:.2f} GiB" if rows else "stopped"
    print(f"# probe {stack} {tokens} tokens: {'fits' if fits else 'over budget'} ({peak})", file=sys.stderr,
          flush=True)
    return fits, row


def longest_sequence(stack: str, path: Path, budget: int, guess: int, *, step: int = 64,
                     precision: float = 1.08) -> tuple[int, list[dict]]:
    """The longest multiple of ``step`` tokens whose training step fits ``budget``: expand from ``guess`` until
    a probe fits and one does not, then bisect until they are within ``precision`` of each other."""
    def rounded(tokens: float) -> int:
        return max(step, int(tokens) // step * step)

    probes: list[dict] = []
    low, high = 0, None
    tokens = rounded(guess)
    while high is None or low == 0:
        fits, row = run_probe(stack, path, tokens, budget)
        probes.append(row)
        if fits:
            low = tokens
            if high is None:
                tokens = rounded(tokens * 1.25) + (step if rounded(tokens * 1.25) == tokens else 0)
        else:
            high = tokens
            if low == 0:
                if tokens == step:
                    return 0, probes
                tokens = rounded(tokens * 0.8)
    while high > low * precision and high - low > step:
        tokens = rounded((low + high) / 2)
        if tokens in (low, high):
            break
        fits, row = run_probe(stack, path, tokens, budget)
        probes.append(row)
        low, high = (tokens, high) if fits else (low, tokens)
    return low, probes


def estimated_bytes_per_token(stack: str, path: Path) -> float:
    """How fast a step's peak grows with the sequence, by :mod:`mtool.train.estimate` (the usual recipe is PEFT's
    layers with full logits)."""
    from mtool.train.estimate import estimate_for_config

    settings = {} if stack == "mtool" else {"model.lean_layers": False, "model.loss": "full"}
    totals = []
    for tokens in (2048, 4096):
        config = mtool_config(path, True, **{"data.seq_len": tokens, "training.micro_batch_size": 1, **settings})
        totals.append(estimate_for_config(config, path, device_type="cpu").estimate.total)
    return (totals[1] - totals[0]) / 2048


def run_child_json(command: list[str]) -> dict:
    completed = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not rows:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return rows[-1]


def memory_part(work: Path, budget_gib: float, tokens: int) -> str:
    path = quantized_checkpoint(make_checkpoint(work / "llama-3.2-1b-shape", LLAMA_1B))
    budget = int(budget_gib * GIB)
    rows = {stack: run_child_json(_child("measure", stack, path, tokens)) for stack in ("usual", "mtool")}
    for stack, row in rows.items():
        print(json.dumps(row), flush=True)
        # first guess: the measured step's peak, growing from there at the estimator's bytes per token
        per_token = estimated_bytes_per_token(stack, path)
        guess = tokens + (budget - row["peak_rss_gib"] * GIB) / per_token
        row["longest"], row["probes"] = longest_sequence(stack, path, budget, max(64.0, guess))
        print(json.dumps({"stack": stack, "longest": row["longest"], "probes": row["probes"]}), flush=True)
    return memory_table(rows, budget_gib, tokens)


def memory_table(rows: dict, budget_gib: float, tokens: int) -> str:
    usual, mine = rows["usual"], rows["mtool"]
    lines = [f"Llama-3.2-1B shape, QLoRA NF4 r={RANK}, float32 on CPU, gradient checkpointing; per-token figures "
             f"from one {tokens}-token step; longest sequence within {budget_gib:g} GiB of resident memory "
             f"(step peak, weights included), batch 1. Machine: {machine()}.", "",
             "| | usual HF + PEFT | mtool | mtool / usual | target |", "|---|---:|---:|---:|---:|",
             f"| FLOPs per token (forward + backward) | {usual['flops_per_token'] / 1e9:.2f} G | "
             f"{mine['flops_per_token'] / 1e9:.2f} G | {mine['flops_per_token'] / usual['flops_per_token']:.3f} "
             f"| <= 1 |",
             f"| bytes kept for backward per token | {usual['saved_bytes_per_token'] / 1024:.0f} KiB | "
             f"{mine['saved_bytes_per_token'] / 1024:.0f} KiB | "
             f"{mine['saved_bytes_per_token'] / usual['saved_bytes_per_token']:.3f} | <= 0.25 |",
             f"| peak RSS of the {tokens}-token step | {usual['peak_rss_gib']:.2f} GiB | "
             f"{mine['peak_rss_gib']:.2f} GiB | {mine['peak_rss_gib'] / usual['peak_rss_gib']:.2f} | |"]
    if "longest" in usual:
        ratio = f"{mine['longest'] / usual['longest']:.1f}x" if usual["longest"] else "-"
        lines.append(f"| longest sequence in {budget_gib:g} GiB | {usual['longest']:,} | {mine['longest']:,} | "
                     f"{ratio} | >= 4x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Part 2: step time of mtool's loop against a plain loop


# mtool's loop with its defaults, and with the model of earlier versions (PEFT's layers, full logits)
SPEED_VARIANTS = {"mtool": {}, "earlier": {"model.lean_layers": False, "model.loss": "full"}}


def mtool_loop(path: Path, rows: list[list[int]], *, total: int, batch: int, seq: int, optimizer: str,
               overrides: dict):
    """A :class:`mtool.train.loop.Loop` over ``rows`` (a tokenized dataset), as ``mtool train`` builds it."""
    import datasets
    import torch

    from mtool.train.batching import plan_steps
    from mtool.train.distributed import Processes
    from mtool.train.loop import Loop
    from mtool.train.metrics import MetricsLog
    from mtool.train.model import build_model, trainable_parameters
    from mtool.train.optim import build_optimizer
    from mtool.train.tokenizer import load_tokenizer

    cpu = torch.device("cpu")
    config = mtool_config(path, False, **{"training.optimizer": optimizer, "training.micro_batch_size": batch,
                                          "data.seq_len": seq, "training.max_steps": total,
                                          "checkpoints.every": 10_000, **overrides})
    tokenizer = load_tokenizer(str(path))
    model, _ = build_model(str(path), tokenizer, config.model, config.lora, device=cpu, seed=0)
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows, "length": [seq] * len(rows)})
    plan = plan_steps([seq] * len(rows), seed=0, epochs=1, max_steps=total, batch_size=batch, seq_len=seq,
                      packing=False, grad_accum=1, world_size=1, rank=0)
    out = Path(config.out)
    return Loop(config=config, model=model, optimizer=build_optimizer(trainable_parameters(model), config.training,
                                                                      cpu),
                train_data=data, eval_data=None, plan=plan, warmup_steps=0, processes=Processes(0, 1, 0, cpu),
                pad_id=tokenizer.pad_token_id, checkpoint_dir=out, metrics=MetricsLog(out / "metrics.jsonl"),
                config_yaml=config.to_yaml())


def speed_rows(path: Path, *, steps: int, rounds: int, batch: int, seq: int, optimizer: str, threads: int) -> dict:
    """Seconds per step of mtool's loop (each of :data:`SPEED_VARIANTS`) and a plain loop, alternating in this
    process (same threads, same batches): wall time and the process's CPU time (steadier on a busy machine,
    with one thread: no spinning threads inflate it)."""
    import torch

    from mtool.train.batching import StepPlan
    from mtool.train.loop import StopRequest, run_loop, train_step

    torch.set_num_threads(threads)
    rows = [random_ids(seq, LLAMA_135M["vocab_size"], seed=i)[0].tolist() for i in range(batch * 8)]
    batches = [torch.tensor(rows[i * batch:(i + 1) * batch]) for i in range(8)]
    warm = 2
    total = warm + steps * rounds
    loops = {name: mtool_loop(path, rows, total=total, batch=batch, seq=seq, optimizer=optimizer,
                              overrides=overrides) for name, overrides in SPEED_VARIANTS.items()}
    plain = usual_model(path, quantized=False)
    parameters = [p for p in plain.parameters() if p.requires_grad]
    if optimizer == "adamw":
        plain_optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    else:
        import bitsandbytes as bnb

        plain_optimizer = bnb.optim.AdamW8bit(parameters, lr=1e-4)

    def plain_steps(count: int, offset: int) -> None:
        for i in range(count):
            ids = batches[(offset + i) % len(batches)]
            loss = plain(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)
            float(loss)

    stop = StopRequest()
    for loop in loops.values():
        for _ in range(warm):
            train_step(loop, stop)
    plain_steps(warm, 0)
    names = [*loops, "plain"]
    times: dict[str, list[float]] = {f"{name}{kind}": [] for name in names for kind in ("", "_cpu")}
    plans = {name: loop.plan for name, loop in loops.items()}
    for round_index in range(rounds):
        target = warm + (round_index + 1) * steps  # run_loop trains up to the end of its plan
        for name in names:
            wall, cpu_time = time.perf_counter(), time.process_time()
            if name == "plain":
                plain_steps(steps, round_index * steps)
            else:
                full = plans[name]
                loops[name].plan = StepPlan(full.steps[:target], full.epochs[:target], full.steps_per_epoch)
                run_loop(loops[name])
            times[name].append((time.perf_counter() - wall) / steps)
            times[f"{name}_cpu"].append((time.process_time() - cpu_time) / steps)
    return {"optimizer": optimizer, "threads": threads, "times": times,
            **{f"{name}_s": statistics.median(values) for name, values in times.items()}}


def speed_part(work: Path, *, steps: int, rounds: int, batch: int, seq: int, threads: int) -> str:
    path = make_checkpoint(work / "llama-135m-shape", LLAMA_135M)
    results = []
    for optimizer in ("adamw", "adamw_8bit"):
        row = run_child_json([sys.executable, __file__, "--speed-run", optimizer, "--model-dir", str(path),
                              "--steps", str(steps), "--rounds", str(rounds), "--batch", str(batch),
                              "--seq", str(seq), "--threads", str(threads)])
        print(json.dumps(row), flush=True)
        results.append(row)
    lines = [f"135M Llama (hidden 576, 30 layers, vocabulary 49,152), LoRA r={RANK} on the seven projections, "
             f"{batch} x {seq} tokens, float32, gradient checkpointing, {threads} thread(s); median of {rounds} "
             f"rounds of {steps} steps, the loops alternating in one process. Machine: {machine()}.", "",
             "| optimizer | plain loop: s/step (CPU s) | mtool: s/step (CPU s) | mtool / plain: wall, CPU | "
             "mtool with PEFT's layers and full logits (earlier defaults): s/step (CPU s) | earlier / plain: "
             "wall, CPU |", "|---|---:|---:|---:|---:|---:|"]
    for row in results:
        def cell(name: str) -> str:
            return f"{row[name + '_s']:.3f} ({row[name + '_cpu_s']:.3f})"

        def ratio(name: str) -> str:
            return f"{row[name + '_s'] / row['plain_s']:.3f}, {row[name + '_cpu_s'] / row['plain_cpu_s']:.3f}"

        lines.append(f"| {row['optimizer']} | {cell('plain')} | {cell('mtool')} | {ratio('mtool')} | "
                     f"{cell('earlier')} | {ratio('earlier')} |")
    return "\n".join(lines)


def machine() -> str:
    cores = os.cpu_count()
    try:
        load = ", load average %.1f" % os.getloadavg()[0]
    except OSError:
        load = ""
    return f"{platform.processor() or platform.machine()}, {cores} cores{load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["memory", "speed", "all"], default="all")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "mtool-train-efficiency",
                        help="where the random checkpoints are made (once)")
    parser.add_argument("--budget-gib", type=float, default=3.0, help="resident memory for the longest sequence")
    parser.add_argument("--tokens", type=int, default=256, help="sequence of the per-token measurements")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the speed part")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--speed-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.model_dir, args.tokens)), flush=True)
        return
    if args.probe:
        print(json.dumps(probe(args.probe, args.model_dir, args.tokens)), flush=True)
        return
    if args.speed_run:
        print(json.dumps(speed_rows(args.model_dir, steps=args.steps, rounds=args.rounds, batch=args.batch,
                                    seq=args.seq, optimizer=args.speed_run, threads=args.threads)), flush=True)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    if args.part in ("memory", "all"):
        tables.append(memory_part(args.work_dir, args.budget_gib, args.tokens))
    if args.part in ("speed", "all"):
        tables.append(speed_part(args.work_dir, steps=args.steps, rounds=args.rounds, batch=args.batch,
                                 seq=args.seq, threads=args.threads))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
