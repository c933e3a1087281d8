"""How fast the CLI answers: `mtool --help` and `mtool merge --help` beside a bare `python -c pass`.

    .venv/bin/python benchmarks/cli_startup_bench.py [--repeats 10]

Heavy libraries (torch, transformers, peft) are imported inside commands only, so help and argument errors
come back at once. Prints a markdown table of median wall times.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

MTOOL = str(Path(sys.executable).with_name("mtool"))


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    floor = median_seconds([sys.executable, "-c", "pass"], args.repeats)
    print("| command | median s | minus bare interpreter |")
    print("|---|---:|---:|")
    print(f"| python -c pass (floor) | {floor:.3f} | - |")
    for command in (["--help"], ["merge", "--help"], ["adapters", "--help"], ["train", "--help"]):
        seconds = median_seconds([MTOOL, *command], args.repeats)
        print(f"| mtool {' '.join(command)} | {seconds:.3f} | {seconds - floor:.3f} |")


if __name__ == "__main__":
    main()
