"""Read and write throughput of mtool's I/O layer against the machine's floor, and the cost of its header parser.

    .venv/bin/python benchmarks/io_bench.py [--gib 1.0] [--repeats 3]

Builds a model-shaped set of bf16 tensors (about ``--gib`` GiB, Llama-like matrices) and measures, each as the
median of ``--repeats`` runs, with the files in the page cache (the state a merge finds them in after the first
read):

* read:  ``open_checkpoint`` + ``read`` of every tensor, beside ``cat FILES > /dev/null`` (the floor) and
  ``safetensors.safe_open(...).get_tensor`` (the library most tools use);
* write: ``CheckpointWriter`` streaming every tensor into 2 shards, beside plain ``write`` calls of the same
  number of bytes from one buffer (the floor), ``cp`` of the written files, and ``safetensors.torch.save_file``;
* headers: mtool's ``open_checkpoint`` (names, shapes, dtypes and the byte offsets that positioned reads and
  mappings need) beside ``safe_open`` + ``get_slice`` of every tensor (names, shapes, dtypes; no offsets), each
  over the written files, median of 200.

Prints markdown tables with GB/s and ratios to the floor.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtool.io.reading import open_checkpoint  # noqa: E402
from mtool.io.writing import CheckpointWriter, TensorSpec


def make_tensors(gib: float) -> dict[str, torch.Tensor]:
    """Llama-shaped bf16 matrices (2048 x 5632 and 2048 x 2048) totalling about ``gib`` GiB.

    Tensors share storage-sized random blocks cloned once each, so building them is quick.
    """
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    total, layer = 0, 0
    while total < gib * 1024**3:
        for name, shape in (("mlp.up_proj", (5632, 2048)), ("mlp.down_proj", (2048, 5632)),
                            ("self_attn.q_proj", (2048, 2048)), ("self_attn.o_proj", (2048, 2048))):
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.bfloat16)
            tensors[f"model.layers.{layer}.{name}.weight"] = tensor
            total += tensor.numel() * 2
        layer += 1
    return tensors


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_medians(functions: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in rounds (one of each per round) so that drift in the
    machine's state (page cache, dirty-page write-back) touches every contender alike."""
    times: dict[str, list[float]] = {label: [] for label in functions}
    for _ in range(repeats):
        for label, function in functions.items():
            times[label].append(timed(function))
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mtool-io-", dir=args.workdir))
    try:
        tensors = make_tensors(args.gib)
        specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
        total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        shard_bytes = total_bytes // 2 + 1

        def write_mtool() -> None:
            out = workdir / "mtool"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            with CheckpointWriter(out, specs, max_shard_bytes=shard_bytes) as writer:
                for name, tensor in tensors.items():
                    writer.write(name, tensor)

        def write_safetensors() -> None:
            out = workdir / "st"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            save_file(tensors, out / "model.safetensors")

        block = bytes(64 * 1024**2)

        def write_floor() -> None:
            with open(workdir / "floor.bin", "wb") as handle:
                for _ in range(-(-total_bytes // len(block))):
                    handle.write(block)

        def write_copy() -> None:
            subprocess.run(["cp", *map(str, sorted((workdir / "mtool").glob("*.safetensors"))), str(workdir / "copy")],
                           check=True)


        write_mtool()
        (workdir / "copy").mkdir()
        results = interleaved_medians({
            "write: one 64 MiB buffer written over and over (floor)": write_floor,
            "write: mtool CheckpointWriter": write_mtool,
            "write: safetensors save_file": write_safetensors,
            "write: cp of the written files (read + write)": write_copy,
        }, args.repeats)
        files = sorted((workdir / "mtool").glob("*.safetensors"))

        def read_floor() -> None:
            subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)

        def read_mtool() -> None:
            checkpoint = open_checkpoint(workdir / "mtool")
            for name in checkpoint.names:
                checkpoint.read(name)

        def read_safetensors() -> None:
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        handle.get_tensor(name).clone()  # own the bytes, as a pread does

        read_floor()  # warm the page cache
        results.update(interleaved_medians({
            "read: cat FILES > /dev/null (floor)": read_floor,
            "read: mtool open_checkpoint + read": read_mtool,
            "read: safetensors safe_open + get_tensor + clone": read_safetensors,
        }, args.repeats))

        def headers_mtool() -> None:
            checkpoint = open_checkpoint(workdir / "mtool")
            for name in checkpoint.names:
                checkpoint.info(name).shape

        def headers_safetensors() -> None:
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        piece.get_shape(), piece.get_dtype()

        headers = interleaved_medians({"headers: mtool open_checkpoint": headers_mtool,
                                       "headers: safetensors safe_open + get_slice": headers_safetensors}, 200)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    gb = total_bytes / 1e9
    print(f"{gb:.2f} GB of bf16 tensors, page cache warm, median of {args.repeats}\n")
    print("| operation | seconds | GB/s | time / floor |")
    print("|---|---:|---:|---:|")
    for kind in ("read", "write"):
        floor = next(v for k, v in results.items() if k.startswith(kind) and "floor" in k)
        for label, seconds in results.items():
            if label.startswith(kind):
                print(f"| {label} | {seconds:.2f} | {gb / seconds:.2f} | {seconds / floor:.2f}x |")
    print(f"\nReading the headers of the same {len(tensors)} tensors in {len(files)} files, median of 200\n")
    print("| operation | ms |")
    print("|---|---:|")
    for label, seconds in headers.items():
        print(f"| {label} | {seconds * 1000:.2f} |")


if __name__ == "__main__":
    main()
