"""QLoRA training throughput and peak memory: mtool's modes beside the anchor stacks, in one job on one GPU.

Usage (CUDA machine; the anchors need the packages of ../shared/gpu/make_site.sh on PYTHONPATH):

    python benchmarks/train_bench.py --model-dir /tmp/l8b             # every stack, 2 x 2048 and 1 x 32768 tokens
    python benchmarks/train_bench.py --model-dir /tmp/l8b --shapes 2x2048 --stacks hf,hf_lean_liger,mtool
    python benchmarks/train_bench.py --tiny                           # CPU smoke run of mtool's modes

Every stack runs in its own process on the same random Llama-3.1-8B-shaped checkpoint (made once by the anchor
script's ``make``), with the same random token batches: 3 warm-up steps, then 10 timed steps of QLoRA (NF4,
double quantization, bf16 compute), LoRA r=16 on the seven projections, 8-bit AdamW, for each micro-batch shape
(``--shapes``, default ``2x2048`` and ``1x32768``: the long-context case).

The anchors (``../shared/gpu/anchor_qlora_bench.py``): ``hf`` (the usual recipe, prepare_model_for_kbit_training),
``hf_lean``, ``hf_lean_liger``, ``unsloth``. mtool runs its own training step
(:func:`mtool.train.loop.train_step`: token-normalized loss, clipping, schedule) on the model
:func:`mtool.train.model.build_model` loads, in each of its modes:

- ``mtool``: the defaults (lean LoRA layers, fused SwiGLU MLP and q/k/v nodes, Liger's RMSNorm/RoPE and fused
  linear cross-entropy);
- ``mtool_triton``: the defaults plus the Triton kernels (NF4 QLoRA matmul with LoRA fused in, SwiGLU);
- ``mtool_offload``: the defaults plus offloaded checkpointing;
- ``mtool_peft_layers``: PEFT's own LoRA layers with Liger's SwiGLU (the stack before the lean layers);
- ``mtool_no_liger``: no Liger at all: mtool's own chunked loss and fused MLP with torch's norms and RoPE.

Reported per stack and shape: tokens/s, step time, peak allocated and reserved GiB, the ratios to the usual HF
recipe; mtool's rows show their memory estimate beside the measurement. A stack that fails (out of memory at
32K, a missing package) is reported as failed and the job goes on.
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
ANCHORS = ("hf", "hf_lean", "hf_lean_liger", "unsloth")
MTOOL_MODES: dict[str, dict] = {
    "mtool": {},
    "mtool_triton": {"model.kernels": "triton"},
    "mtool_offload": {"model.offload_activations": True},
    "mtool_peft_layers": {"model.lean_layers": False},
    "mtool_no_liger": {"model.liger": "off"},
}


def mtool_run(model_dir: Path, seq: int, batch: int, device_type: str, mode: str) -> dict:
    """One mtool QLoRA run in this process, in ``mode``; returns the JSON row."""
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
        **MTOOL_MODES[mode],
    })
    started = time.time()
    tokenizer = load_tokenizer(str(model_dir))
    model, modes = build_model(str(model_dir), tokenizer, config.model, config.lora, device=device, seed=0)
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
    return {"framework": mode, "seq": seq, "batch": batch, "modes": modes.describe(), "load_s": round(load_s, 1),
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


def run_stack(stack: str, model_dir: Path, anchor: Path, seq: int, batch: int) -> dict:
    """One stack in its own process (so each starts with an empty GPU); a failed row when it failed."""
    env = {**os.environ, "SEQ": str(seq), "BATCH": str(batch)}
    if stack in MTOOL_MODES:
        command = [sys.executable, __file__, "--mtool-run", stack, "--model-dir", str(model_dir), "--seq", str(seq),
                   "--batch", str(batch)]
    else:
        command = [sys.executable, str(anchor), "run", str(model_dir), stack]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    rows = [r for r in _json_rows(completed.stdout) if "tokens_per_s" in r]
    if completed.returncode != 0 or not rows:
        reason = "out of memory" if "out of memory" in completed.stderr.lower() else \
            (completed.stderr.strip().splitlines() or ["no output"])[-1][:200]
        print(f"# {stack} {batch}x{seq} failed (exit {completed.returncode}): {completed.stderr.strip()[-600:]}",
              file=sys.stderr)
        return {"framework": stack, "seq": seq, "batch": batch, "failed": reason}
    return rows[-1]


def table(rows: list[dict], device_name: str) -> str:
    lines = [f"GPU: {device_name}; QLoRA NF4 r={RANK}, 8-bit AdamW, bf16 (float32 on a CPU); {WARM} warm-up + "
             f"{STEPS} timed steps.", "",
             "| shape | stack | tokens/s | step (s) | peak allocated (GiB) | peak reserved (GiB) | tokens/s vs hf "
             "| memory vs hf | mtool estimate (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in dict.fromkeys((r["batch"], r["seq"]) for r in rows):
        group = [r for r in rows if (r["batch"], r["seq"]) == shape]
        reference = next((r for r in group if r["framework"] == "hf" and "failed" not in r), None)
        for row in group:
            label = f"{shape[0]} x {shape[1]}"
            if "failed" in row:
                lines.append(f"| {label} | {row['framework']} | failed: {row['failed']} | | | | | | |")
                continue
            speed = f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"
            memory = f"{row['peak_alloc_gib'] / reference['peak_alloc_gib']:.2f}x" if reference else "-"
            lines.append(f"| {label} | {row['framework']} | {row['tokens_per_s']:,.0f} | {row['step_s']} | "
                         f"{row['peak_alloc_gib']} | {row.get('peak_reserved_gib') or '-'} | {speed} | {memory} | "
                         f"{row.get('estimate_gib', '-')} |")
    return "\n".join(lines)


def tiny_model(folder: Path) -> Path:
    from mtool.tinymodels import TinySpec, make_tiny_model

    if not (folder / "config.json").is_file():
        make_tiny_model(folder, TinySpec(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                                         num_kv_heads=2, vocab_size=2048))
    return folder


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2x2048,1x32768"`` -> ``[(2, 2048), (1, 32768)]`` (batch x sequence)."""
    shapes = []
    for part in text.split(","):
        batch, _, seq = part.strip().partition("x")
        shapes.append((int(batch), int(seq)))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="checkpoint folder (made with the anchor script if empty)")
    parser.add_argument("--anchor-script", type=Path, default=DEFAULT_ANCHOR)
    parser.add_argument("--stacks", default=",".join(ANCHORS + tuple(MTOOL_MODES)))
    parser.add_argument("--shapes", default="2x2048,1x32768", help="micro-batch shapes, batch x sequence")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of mtool's modes on a tiny model")
    parser.add_argument("--mtool-run", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    import torch

    if args.mtool_run:
        print(json.dumps(mtool_run(args.model_dir, args.seq, args.batch, "cuda" if torch.cuda.is_available()
                                   else "cpu", args.mtool_run)), flush=True)
        return
    if args.tiny:
        folder = tiny_model(args.model_dir or Path(tempfile.gettempdir()) / "mtool-train-bench-tiny")
        modes = [m for m in MTOOL_MODES if m != "mtool_triton"]  # Triton's kernels need CUDA
        rows = [mtool_run(folder, seq=128, batch=2, device_type="cpu", mode=mode) for mode in modes]
        for row in rows:
            print(json.dumps(row))
        print(table(rows, "none (CPU smoke run; the anchor stacks and Triton need CUDA)"))
        return
    if not torch.cuda.is_available():
        sys.exit("a CUDA GPU is needed for the side-by-side run (use --tiny for the CPU smoke run)")
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / "mtool-train-bench-l8b"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(args.anchor_script), "make", str(model_dir)], check=True)
    rows = []
    for batch, seq in parse_shapes(args.shapes):
        for stack in args.stacks.split(","):
            row = run_stack(stack.strip(), model_dir, args.anchor_script, seq, batch)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows, torch.cuda.get_device_name(0)))


if __name__ == "__main__":
    main()
