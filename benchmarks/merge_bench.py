"""mtool merge beside mergekit on a TinyLlama-1.1B-shaped model: wall time, peak memory, the I/O floor.

    .venv/bin/python benchmarks/merge_bench.py [--methods linear,slerp,ties,dare_ties] [--repeats 3]
                                               [--mergekit-repeats 2] [--layers 22] [--cold-cache]

mtool hashes every input file into the output's lineage record (mergekit does not). Each mtool repeat runs
twice: with an empty hash cache (a first merge of these files: hashing included) and again with the cache the
first run filled (any later merge of the same files, or Hub-cache inputs, whose file names are their hashes).
Every timed run starts after ``sync``, so no run pays for the dirty pages of the one before. Builds once (cached
in benchmarks/_work/) a bf16 base of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32
heads, 4 KV heads, vocab 32000) and two "fine-tunes" (base + noise), each sharded in 1GB files. Each tool runs
the same recipe in its own process (mergekit from .mkvenv or $MTOOL_MERGEKIT_PYTHON); wall time is the median
of the repeats, peak memory the child's maximum resident set. The floor is reading the inputs once (``cat`` to
/dev/null) plus writing the output's bytes, with the page cache as warm as the tools find it, measured between
the mtool repeats so that both see the same state of the machine. mtool's start-up (Python, torch, reading the
recipe and the headers, planning) is timed on its own with ``--dry-run``; the rest is the merge itself.

``--cold-cache`` (root only) adds a table for inputs read from disk: the page cache is dropped before every
mtool run (hashes cached) and every floor, whose reads then run one ``cat`` per input model at once.
Prints markdown tables (and, on stderr, every run's time as JSON).
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

    from mtool.io.writing import CheckpointWriter, TensorSpec
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


def run_measured(command: list[str], env: dict | None = None, *, sync: bool = True) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command run in a child process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:]).returncode; w = time.perf_counter() - t; "
               "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    if sync:
        os.sync()  # start without the previous run's dirty pages being written back meanwhile
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-3000:]}")
    wall, rss_kib = result.stdout.split()[-2:]
    return float(wall), int(rss_kib) / 2**20


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def floor_seconds(inputs: list[Path], output_bytes: int, out: Path, *, cold: bool = False) -> float:
    """Read every input file once, then write ``output_bytes``. Warm: one ``cat`` of all the files (page cache
    to /dev/null). Cold (page cache dropped first): one ``cat`` per input folder at once, as the disk is faster
    with a reader per file."""
    groups = [[str(f) for f in sorted(folder.glob("*.safetensors"))] for folder in inputs]
    if cold:
        drop_page_cache()
    else:
        os.sync()
    started = time.perf_counter()
    readers = [subprocess.Popen(["cat", *files], stdout=subprocess.DEVNULL)
               for files in (groups if cold else [sum(groups, [])])]
    if any(reader.wait() for reader in readers):
        raise RuntimeError("cat failed")
    block = bytes(64 * 1024**2)
    with open(out, "wb") as handle:
        for _ in range(-(-output_bytes // len(block))):
            handle.write(block)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


def startup_seconds(mtool: list[str], recipe: Path, env: dict, repeats: int) -> float:
    """mtool up to the first byte of merging: start-up, reading the recipe and headers, planning (--dry-run)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([*mtool, str(recipe), "--dry-run"], stdout=subprocess.DEVNULL, check=True, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cold_cache_row(method: str, mtool: list[str], recipe: Path, inputs: list[Path], env: dict,
                   repeats: int) -> dict:
    """mtool (hashes cached) and the floor, each with the page cache dropped first."""
    out = WORK / f"out-{method}"
    cache = WORK / f"hash-cache-{method}-cold"
    shutil.rmtree(cache, ignore_errors=True)
    subprocess.run([*mtool, str(recipe), str(out), "--no-card", "--force"], check=True,
                   env=dict(env, MTOOL_CACHE_DIR=str(cache)))  # fills the hash cache
    output_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    times, floors = [], []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        drop_page_cache()
        times.append(run_measured([*mtool, str(recipe), str(out), "--no-card"], dict(env, MTOOL_CACHE_DIR=str(cache)),
                                  sync=False)[0])
        floors.append(floor_seconds(inputs, output_bytes, WORK / "floor.bin", cold=True))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {"method": method, "cold_mtool_s": statistics.median(times), "cold_floor_s": statistics.median(floors),
            "runs": {"cold_mtool_s": times, "cold_floor_s": floors}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--cold-cache", action="store_true", help="also time inputs read from disk (root only)")
    args = parser.parse_args()
    if args.cold_cache and os.geteuid() != 0:
        parser.error("--cold-cache drops the page cache (/proc/sys/vm/drop_caches), which needs root")

    from tests.support.mergekit_ref import mergekit_python

    folders = build_models(args.layers)
    mergekit = None if args.skip_mergekit else mergekit_python()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    mtool = [str(REPO / ".venv" / "bin" / "mtool"), "-q", "merge"]
    rows, cold_rows = [], []
    for method in args.methods.split(","):
        recipe = WORK / f"{method}.yaml"
        recipe.write_text(RECIPES[method].format(**{k: str(v.resolve()) for k, v in folders.items()}))
        inputs = [folders[name] for name in INPUTS[method]]
        subprocess.run(["cat", *[str(f) for d in inputs for f in d.glob("*.safetensors")]],
                       stdout=subprocess.DEVNULL, check=True)  # warm the page cache for everyone
        out = WORK / f"out-{method}"
        times, warm_times, peaks, floors = [], [], [], []
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
            shutil.rmtree(out, ignore_errors=True)
            floors.append(floor_seconds(inputs, output_bytes, WORK / "floor.bin"))
        row = {"method": method, "mtool_s": statistics.median(times), "mtool_warm_s": statistics.median(warm_times),
               "mtool_gib": max(peaks), "floor_s": statistics.median(floors),
               "startup_s": startup_seconds(mtool, recipe, env, args.repeats),
               "runs": {"mtool_s": times, "mtool_warm_s": warm_times, "floor_s": floors}}
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
            row["runs"]["mergekit_s"] = mk_times
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.cold_cache:
            cold_rows.append(cold_cache_row(method, mtool, recipe, inputs, env, args.repeats))
            print(json.dumps(cold_rows[-1]), file=sys.stderr, flush=True)

    print(f"\nTinyLlama-1.1B shape ({args.layers} layers), bf16, 1GB shards; median of {args.repeats} (mtool) / "
          f"{args.mergekit_repeats} (mergekit) runs; {os.cpu_count()} CPU cores; page cache warm\n")
    print("| method | mergekit s | mtool s (hashing inputs) | speed-up | mtool s (hashes cached) | speed-up | "
          "mergekit peak RSS | mtool peak RSS | RSS ratio | I/O floor s | mtool / floor | mtool start-up s | "
          "merging s | merging / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        mk_s, mk_g = row.get("mergekit_s"), row.get("mergekit_gib")
        cold, warm, floor, startup = row["mtool_s"], row["mtool_warm_s"], row["floor_s"], row["startup_s"]
        mergekit_cells = (f"{mk_s:.1f} | {cold:.1f} | {mk_s / cold:.1f}x | {warm:.1f} | {mk_s / warm:.1f}x | "
                          f"{mk_g:.2f} GiB | {row['mtool_gib']:.2f} GiB | {row['mtool_gib'] / mk_g:.2f}"
                          if mk_s else f"- | {cold:.1f} | - | {warm:.1f} | - | - | {row['mtool_gib']:.2f} GiB | -")
        print(f"| {row['method']} | {mergekit_cells} | {floor:.1f} | {cold / floor:.2f}x / {warm / floor:.2f}x | "
              f"{startup:.1f} | {warm - startup:.1f} | {(warm - startup) / floor:.2f}x |")
    if cold_rows:
        print("\nPage cache dropped before every run (inputs read from disk), hashes cached\n")
        print("| method | mtool s | I/O floor s (from disk) | mtool / floor |")
        print("|---|---:|---:|---:|")
        for row in cold_rows:
            print(f"| {row['method']} | {row['cold_mtool_s']:.1f} | {row['cold_floor_s']:.1f} | "
                  f"{row['cold_mtool_s'] / row['cold_floor_s']:.2f}x |")


if __name__ == "__main__":
    main()
