"""mtool merge beside mergekit on a TinyLlama-1.1B-shaped model: wall time, peak memory, the I/O floor.

    .venv/bin/python benchmarks/merge_bench.py [--methods linear,slerp,ties,dare_ties] [--repeats 3]
                                               [--mergekit-repeats 2] [--layers 22]

mtool hashes every input file into the output's lineage record (mergekit does not). Each mtool repeat runs
twice: with an empty hash cache (a first merge of these files: hashing included) and again with the cache the
first run filled (any later merge of the same files, or Hub-cache inputs, whose file names are their hashes).
Every timed run starts after ``sync``, so no run pays for the dirty pages of the one before. Builds once (cached in benchmarks/_work/) a bf16 base of TinyLlama-1.1B's shape (hidden 2048, intermediate
5632, 22 layers, 32 heads, 4 KV heads, vocab 32000) and two "fine-tunes" (base + noise), each sharded in 1GB
files. Each tool runs the same recipe in its own process (mergekit from .mkvenv or $MTOOL_MERGEKIT_PYTHON);
wall time is the median of the repeats, peak memory the child's maximum resident set. The floor is reading the
inputs once (``cat`` to /dev/null) plus writing the output's bytes, with the page cache as warm as the tools
find it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / "benchmarks" / "_work" / "merge"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)
RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
              "  - model: {ft2}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
             "parameters:\n  t: [0.2, 0.8]\ndtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, "
            "density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: "
                 "{{weight: 0.5, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                 "dtype: bfloat16\n",
}
INPUTS = {"linear": ("ft1", "ft2"), "slerp": ("base", "ft1"), "ties": ("base", "ft1", "ft2"),
          "dare_ties": ("base", "ft1", "ft2")}


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                       f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
                       f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                       f"{p}.mlp.down_proj.weight": (h, i), f"{p}.input_layernorm.weight": (h,),
                       f"{p}.post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def build_models(layers: int) -> dict[str, Path]:
    """base, ft1, ft2 (bf16, 1GB shards) written with the streaming writer; cached."""
    import torch
    from transformers import LlamaConfig

    from mtool.checkpoint import CheckpointWriter, TensorSpec
    from mtool.tinymodels import build_tokenizer

    root = WORK / f"layers{layers}"
    folders = {name: root / name for name in ("base", "ft1", "ft2")}
    if all((f / "config.json").is_file() for f in folders.values()):
        return folders
    shutil.rmtree(root, ignore_errors=True)
    shapes = tensor_shapes(layers)
    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, tie_word_embeddings=False, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    tokenizer = build_tokenizer()
    for index, (name, folder) in enumerate(folders.items()):
        folder.mkdir(parents=True)
        specs = [TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()]
        with CheckpointWriter(folder, specs, max_shard_bytes=1000**3) as writer:
            for tensor_index, (tensor_name, shape) in enumerate(shapes.items()):
                base = torch.randn(shape, generator=torch.Generator().manual_seed(tensor_index)) * 0.02
                if index:
                    noise = torch.Generator().manual_seed(1000 * index + tensor_index)
                    base += torch.randn(shape, generator=noise) * 0.002
                writer.write(tensor_name, base.to(torch.bfloat16))
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"built {folder}", file=sys.stderr)
    return folders


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command run in a child process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:]).returncode; w = time.perf_counter() - t; "
               "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    os.sync()  # start without the previous run's dirty pages being written back meanwhile
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-3000:]}")
    wall, rss_kib = result.stdout.split()[-2:]
    return float(wall), int(rss_kib) / 2**20


def floor_seconds(inputs: list[Path], output_bytes: int, out: Path) -> float:
    files = [str(f) for folder in inputs for f in sorted(folder.glob("*.safetensors"))]
    os.sync()
    started = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    block = bytes(64 * 1024**2)
    with open(out, "wb") as handle:
        for _ in range(-(-output_bytes // len(block))):
            handle.write(block)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--skip-mergekit", action="store_true")
    args = parser.parse_args()

    from tests.support.mergekit_ref import mergekit_python

    folders = build_models(args.layers)
    mergekit = None if args.skip_mergekit else mergekit_python()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    mtool = [str(REPO / ".venv" / "bin" / "mtool"), "-q", "merge"]
    rows = []
    for method in args.methods.split(","):
        recipe = WORK / f"{method}.yaml"
        recipe.write_text(RECIPES[method].format(**{k: str(v.resolve()) for k, v in folders.items()}))
        inputs = [folders[name] for name in INPUTS[method]]
        subprocess.run(["cat", *[str(f) for d in inputs for f in d.glob("*.safetensors")]],
                       stdout=subprocess.DEVNULL, check=True)  # warm the page cache for everyone
        out = WORK / f"out-{method}"
        times, warm_times, peaks = [], [], []
        for repeat in range(args.repeats):
            cache = WORK / f"hash-cache-{method}-{repeat}"
            shutil.rmtree(cache, ignore_errors=True)
            for timings in (times, warm_times):  # empty hash cache, then the cache that run filled
                shutil.rmtree(out, ignore_errors=True)
                wall, peak = run_measured([*mtool, str(recipe), str(out), "--no-card"],
                                          dict(env, MTOOL_CACHE_DIR=str(cache)))
                timings.append(wall)
                peaks.append(peak)
            shutil.rmtree(cache, ignore_errors=True)
        output_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        floor = statistics.median(floor_seconds(inputs, output_bytes, WORK / "floor.bin") for _ in range(3))
        row = {"method": method, "mtool_s": statistics.median(times), "mtool_warm_s": statistics.median(warm_times),
               "mtool_gib": max(peaks), "floor_s": floor}
        shutil.rmtree(out, ignore_errors=True)
        if mergekit is not None:
            mk_times, mk_peaks = [], []
            mk_out = WORK / f"mergekit-{method}"
            for _ in range(args.mergekit_repeats):
                shutil.rmtree(mk_out, ignore_errors=True)
                wall, peak = run_measured([str(mergekit.parent / "mergekit-yaml"), str(recipe), str(mk_out),
                                           "--no-copy-tokenizer", "--quiet"], env)
                mk_times.append(wall)
                mk_peaks.append(peak)
            shutil.rmtree(mk_out, ignore_errors=True)
            row.update(mergekit_s=statistics.median(mk_times), mergekit_gib=max(mk_peaks))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\nTinyLlama-1.1B shape ({args.layers} layers), bf16, 3 inputs of 1GB shards; median of "
          f"{args.repeats} (mtool) / {args.mergekit_repeats} (mergekit) runs; {os.cpu_count()} CPU cores\n")
    print("| method | mergekit s | mtool s (hashing inputs) | speed-up | mtool s (hashes cached) | speed-up | "
          "mergekit peak RSS | mtool peak RSS | RSS ratio | I/O floor s | mtool / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        mk_s, mk_g = row.get("mergekit_s"), row.get("mergekit_gib")
        cold, warm, floor = row["mtool_s"], row["mtool_warm_s"], row["floor_s"]
        ratio = f"{cold / floor:.2f}x / {warm / floor:.2f}x"
        print(f"| {row['method']} | {mk_s:.1f} | {cold:.1f} | {mk_s / cold:.1f}x | {warm:.1f} | {mk_s / warm:.1f}x | "
              f"{mk_g:.2f} GiB | {row['mtool_gib']:.2f} GiB | {row['mtool_gib'] / mk_g:.2f} | {floor:.1f} | {ratio} |"
              if mk_s else
              f"| {row['method']} | - | {cold:.1f} | - | {warm:.1f} | - | - | {row['mtool_gib']:.2f} GiB | - | "
              f"{floor:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
