"""QLoRA training throughput and peak memory: mtool beside the anchor stacks, in one job on one GPU.

Usage (CUDA machine; the anchors need the packages of ../shared/gpu/make_site.sh on PYTHONPATH):

    python benchmarks/train_bench.py --model-dir /tmp/l8b             # 8B Llama shape, 2 x 2048 tokens, r=16
    python benchmarks/train_bench.py --model-dir /tmp/l8b --stacks hf,hf_lean,hf_lean_liger,unsloth
    python benchmarks/train_bench.py --tiny                           # CPU smoke run of mtool's code path

Every stack runs in its own process on the same random Llama-3.1-8B-shaped checkpoint (made once by the anchor
script's ``make``), with the same random token batches: 3 warm-up steps, then 10 timed steps of QLoRA
(NF4, double quantization, bf16 compute), LoRA r=16 on the seven projections, 8-bit AdamW. mtool runs its own
training step (:func:`mtool.train.loop.train_step`: token-normalized loss, clipping, schedule) on the model
:func:`mtool.train.model.build_model` loads (lean loading, non-reentrant checkpointing, Liger when installed).
Reported per stack: tokens/s, step time, peak allocated and reserved GiB, and the ratios to the usual HF recipe
(``hf``: prepare_model_for_kbit_training); mtool's row also shows its memory estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR = REPO.parent / "shared" / "gpu" / "anchor_qlora_bench.py"
WARM, STEPS, RANK, BATCHES = 3, 10, 16, 4


def mtool_run(model_dir: Path, seq: int, batch: int, device_type: str) -> dict:
    """One mtool QLoRA run in this process; returns the JSON row."""
    import datasets
    import torch

    from mtool.train.batching import plan_steps
    from mtool.train.config import load_config
    from mtool.train.distributed import Processes
    from mtool.train.estimate import estimate_for_config
    from mtool.train.loop import Loop, StopRequest, train_step
    from mtool.train.measure import measure_peak_bytes
    from mtool.train.metrics import MetricsLog
    from mtool.train.model import build_model, trainable_parameters
    from mtool.train.optim import build_optimizer
    from mtool.train.tokenizer import load_tokenizer

    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    config = load_config(None, {
        "base": str(model_dir), "out": tempfile.mkdtemp(prefix="mtool-bench-"), "data.path": ["random"],
        "model.quantization": "nf4", "model.compute_dtype": "auto" if device_type == "cuda" else "float32",
        "lora.rank": RANK, "lora.alpha": RANK, "lora.dropout": 0.0, "data.seq_len": seq,
        "training.micro_batch_size": batch, "training.optimizer": "adamw_8bit", "training.lr": 1e-4,
        "training.warmup_steps": 0, "training.schedule": "constant", "training.max_steps": WARM + STEPS,
    })
    started = time.time()
    tokenizer = load_tokenizer(str(model_dir))
    model, modes = build_model(str(model_dir), tokenizer, config.model, config.lora, device=device, seed=0)
    liger = modes.liger
    optimizer = build_optimizer(trainable_parameters(model), config.training, device)
    vocab = min(128000, model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (seq,), generator=generator).tolist() for _ in range(BATCHES * batch)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows, "length": [seq] * len(rows)})
    plan = plan_steps([seq] * len(rows), seed=0, epochs=1, max_steps=WARM + STEPS, batch_size=batch, seq_len=seq,
                      packing=False, grad_accum=1, world_size=1, rank=0)
    loop = Loop(config=config, model=model, optimizer=optimizer, train_data=data, eval_data=None, plan=plan,
                warmup_steps=0, processes=Processes(0, 1, 0, device), pad_id=tokenizer.pad_token_id or 0,
                checkpoint_dir=Path(config.out), metrics=MetricsLog(Path(config.out) / "m.jsonl"),
                config_yaml=config.to_yaml())
    load_s = time.time() - started
    losses: list[float] = []
    stop = StopRequest()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(WARM):
        losses.append(train_step(loop, stop).loss)

    def timed() -> None:
        for _ in range(STEPS):
            losses.append(train_step(loop, stop).loss)

    resident = list(model.parameters()) + list(model.buffers())
    resident += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.time()
    peak = measure_peak_bytes(timed, resident, device) if device.type == "cpu" else None
    if device.type == "cuda":
        timed()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    seconds = time.time() - t0
    estimate = estimate_for_config(config, model_dir, device_type=device.type).estimate
    return {"framework": "mtool", "seq": seq, "batch": batch, "liger": liger, "load_s": round(load_s, 1),
            "tokens_per_s": round(STEPS * batch * seq / seconds, 1), "step_s": round(seconds / STEPS, 3),
            "peak_alloc_gib": round(peak / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
            if device.type == "cuda" else None,
            "estimate_gib": round(estimate.total / 2**30, 3),
            "trainable": sum(p.numel() for p in trainable_parameters(model)),
            "losses": [round(x, 4) for x in losses[-3:]]}


def _json_rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def run_stack(stack: str, model_dir: Path, anchor: Path, seq: int, batch: int) -> dict | None:
    """One stack in its own process (so each starts with an empty GPU); None when it failed."""
    env = {**os.environ, "SEQ": str(seq), "BATCH": str(batch)}
    if stack == "mtool":
        command = [sys.executable, __file__, "--mtool-run", "--model-dir", str(model_dir), "--seq", str(seq),
                   "--batch", str(batch)]
    else:
        command = [sys.executable, str(anchor), "run", str(model_dir), stack]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    rows = [r for r in _json_rows(completed.stdout) if "tokens_per_s" in r]
    if completed.returncode != 0 or not rows:
        print(f"# {stack} failed (exit {completed.returncode}): {completed.stderr.strip()[-600:]}", file=sys.stderr)
        return None
    return rows[-1]


def table(rows: list[dict], device_name: str) -> str:
    reference = next((r for r in rows if r["framework"] == "hf"), None)
    lines = [f"GPU: {device_name}", "",
             "| stack | tokens/s | step (s) | peak allocated (GiB) | peak reserved (GiB) "
             "| tokens/s vs hf | memory vs hf |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        speed = f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"
        memory = f"{row['peak_alloc_gib'] / reference['peak_alloc_gib']:.2f}x" if reference else "-"
        lines.append(f"| {row['framework']} | {row['tokens_per_s']:,.0f} | {row['step_s']} | {row['peak_alloc_gib']} | "
                     f"{row.get('peak_reserved_gib') or '-'} | {speed} | {memory} |")
    mtool = next((r for r in rows if r["framework"] == "mtool"), None)
    if mtool:
        lines.append(f"\nmtool's estimate: {mtool['estimate_gib']} GiB (measured {mtool['peak_alloc_gib']} GiB)")
    return "\n".join(lines)


def tiny_model(folder: Path) -> Path:
    from mtool.tinymodels import TinySpec, make_tiny_model

    if not (folder / "config.json").is_file():
        make_tiny_model(folder, TinySpec(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                                         num_kv_heads=2, vocab_size=2048))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="checkpoint folder (made with the anchor script if empty)")
    parser.add_argument("--anchor-script", type=Path, default=DEFAULT_ANCHOR)
    parser.add_argument("--stacks", default="hf,hf_lean,hf_lean_liger,unsloth,mtool")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of mtool's path on a tiny model")
    parser.add_argument("--mtool-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    import torch

    if args.mtool_run:
        print(json.dumps(mtool_run(args.model_dir, args.seq, args.batch, "cuda" if torch.cuda.is_available()
                                   else "cpu")), flush=True)
        return
    if args.tiny:
        folder = tiny_model(args.model_dir or Path(tempfile.gettempdir()) / "mtool-train-bench-tiny")
        row = mtool_run(folder, seq=min(args.seq, 128), batch=args.batch, device_type="cpu")
        print(json.dumps(row))
        print(table([row], "none (CPU smoke run; the anchor stacks need CUDA)"))
        return
    if not torch.cuda.is_available():
        sys.exit("a CUDA GPU is needed for the side-by-side run (use --tiny for the CPU smoke run)")
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / "mtool-train-bench-l8b"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(args.anchor_script), "make", str(model_dir)], check=True)
    rows = [row for stack in args.stacks.split(",")
            if (row := run_stack(stack.strip(), model_dir, args.anchor_script, args.seq, args.batch))]
    for row in rows:
        print(json.dumps(row))
    print(table(rows, torch.cuda.get_device_name(0)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
