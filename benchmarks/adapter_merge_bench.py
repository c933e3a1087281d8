"""mtool adapters merge beside PEFT (load + PeftModel + merge_and_unload + save_pretrained): wall time, peak RSS.

    .venv/bin/python benchmarks/adapter_merge_bench.py [--layers 22] [--repeats 3] [--rank 16]

Builds once (cached in benchmarks/_work/adapter_merge/) a bf16 base of TinyLlama-1.1B's shape (hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000; 1GB shards) and a float32 rank-16 LoRA adapter
(alpha 32) on all seven linear projections of every layer, written directly in PEFT's format. Each tool runs in
its own process with the page cache warm; wall time is the median over the repeats (process start and imports
included, as a user sees it), peak memory the child's maximum resident set. mtool hashes its inputs for the
lineage record from scratch each run (no hash cache). The two outputs are compared tensor by tensor. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.merge_bench import SHAPE, tensor_shapes  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "adapter_merge"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_inputs(layers: int, rank: int) -> tuple[Path, Path]:
    """The bf16 base and the float32 adapter (cached)."""
    import torch
    from transformers import LlamaConfig

    from mtool.io.writing import CheckpointWriter, TensorSpec, save_tensors

    base, adapter = WORK / f"layers{layers}" / "base", WORK / f"layers{layers}" / f"lora-r{rank}"
    shapes = tensor_shapes(layers)
    if not (base / "config.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        specs = [TensorSpec(name, shape, torch.bfloat16) for name, shape in shapes.items()]
        with CheckpointWriter(base, specs, max_shard_bytes=1000**3) as writer:
            for index, (name, shape) in enumerate(shapes.items()):
                generator = torch.Generator().manual_seed(index)
                tensor = (torch.ones(shape) if len(shape) == 1
                          else torch.empty(shape).normal_(0, 0.02, generator=generator))
                writer.write(name, tensor.to(torch.bfloat16))
        LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, tie_word_embeddings=False, dtype="bfloat16",
                    architectures=["LlamaForCausalLM"]).save_pretrained(base)
        print(f"built {base}", file=sys.stderr)
    if not (adapter / "adapter_config.json").is_file():
        adapter.mkdir(parents=True, exist_ok=True)
        tensors = {}
        generator = torch.Generator().manual_seed(1)
        for name, shape in shapes.items():
            module = name.removesuffix(".weight")
            if not module.endswith(TARGETS):
                continue
            out_features, in_features = shape
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 1e-3
        save_tensors(adapter, tensors, file_stem="adapter_model")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                  "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                  "base_model_name_or_path": str(base), "inference_mode": True}
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
        print(f"built {adapter}", file=sys.stderr)
    return base, adapter


def run_measured(command: list[str], env: dict) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user + system, peak RSS GiB) of ``command`` run in a child process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:]).returncode; w = time.perf_counter() - t; "
               "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(w, u.ru_utime + u.ru_stime, u.ru_maxrss); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-3000:]}")
    wall, cpu, rss_kib = result.stdout.split()[-3:]
    return float(wall), float(cpu), int(rss_kib) / 2**20


def peft_merge(base: str, adapter: str, out: str) -> None:
    """What a PEFT user runs: load the base, wrap it with the adapter, merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


def compare(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """(largest relative Frobenius difference of a tensor, elements that differ, elements)."""
    from mtool.io.reading import open_checkpoint

    mine, peft = open_checkpoint(ours), open_checkpoint(theirs)
    worst, differing, total = 0.0, 0, 0
    for name in mine.names:
        a, b = mine.read(name).float(), peft.read(name).float()
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
        differing += int((a != b).sum())
        total += a.numel()
    return worst, differing, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child-peft", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_peft:
        peft_merge(*args.child_peft)
        return

    base, adapter = build_inputs(args.layers, args.rank)
    outputs = {"mtool": WORK / "out-mtool", "peft": WORK / "out-peft"}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    commands = {
        "mtool": [str(REPO / ".venv" / "bin" / "mtool"), "-q", "adapters", "merge", str(base), str(adapter),
                  str(outputs["mtool"])],
        "peft": [sys.executable, __file__, "--child-peft", str(base), str(adapter), str(outputs["peft"])],
    }
    subprocess.run(["cat", *map(str, sorted(base.glob("*.safetensors")))], stdout=subprocess.DEVNULL, check=True)
    runs: dict[str, list[tuple[float, float, float]]] = {"mtool": [], "mtool-cached": [], "peft": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:  # a fresh hash cache: mtool hashes the base from scratch
            shutil.rmtree(outputs["mtool"], ignore_errors=True)  # every run writes a new folder
            runs["mtool"].append(run_measured(commands["mtool"], dict(env, MTOOL_CACHE_DIR=cache)))
            # the same with the base's hashes remembered, as on every later merge into this base
            shutil.rmtree(outputs["mtool"], ignore_errors=True)
            runs["mtool-cached"].append(run_measured(commands["mtool"], dict(env, MTOOL_CACHE_DIR=cache)))
        shutil.rmtree(outputs["peft"], ignore_errors=True)
        runs["peft"].append(run_measured(commands["peft"], env))
        print({tool: f"{r[-1][0]:.2f} s wall, {r[-1][1]:.2f} s CPU, {r[-1][2]:.2f} GiB" for tool, r in runs.items()},
              file=sys.stderr)
    worst, differing, total = compare(outputs["mtool"], outputs["peft"])
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9

    def summary(tool: str) -> tuple[float, float, float, float]:
        """(median wall, best wall, median CPU, largest peak RSS)."""
        walls, cpus, peaks = zip(*runs[tool])
        return statistics.median(walls), min(walls), statistics.median(cpus), max(peaks)

    peft = summary("peft")
    print(f"\nTinyLlama-1.1B shape, {args.layers} layers, bf16 base {size:.2f} GB, LoRA r={args.rank} on "
          f"{len(TARGETS)} projections x {args.layers} layers; {args.repeats} runs each, {os.cpu_count()} CPUs "
          f"(shared)\n")
    print("| tool | wall time, median (best) | CPU time | peak RSS | wall vs PEFT | RSS vs PEFT |")
    print("|---|---|---|---|---|---|")
    labels = {"peft": "PEFT: load + merge_and_unload + save_pretrained",
              "mtool": "mtool adapters merge (hashes the base)",
              "mtool-cached": "mtool adapters merge (base hash cached)"}
    for tool in ("peft", "mtool", "mtool-cached"):
        wall, best, cpu, peak = summary(tool)
        ratios = "1 | 1" if tool == "peft" else f"{peft[0] / wall:.2f}x faster | {peak / peft[3]:.2f}x"
        print(f"| {labels[tool]} | {wall:.2f} s ({best:.2f} s) | {cpu:.2f} s | {peak:.2f} GiB | {ratios} |")
    print(f"\noutputs: largest relative difference of a tensor {worst:.2e}; {differing:,} of {total:,} values differ")
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
