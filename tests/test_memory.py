"""The allocator settings of the streaming commands, checked by the page faults they save, and restored after
(in a subprocess: the settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import contextlib, resource, sys
import torch
from mtool.runtime import REUSE_FREED_BUFFERS, allocator_policy

def faults(elements=1 << 20):
    source = torch.ones(elements, dtype=torch.bfloat16)
    for _ in range(20):
        source.to(torch.float32)  # warm-up: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(300):
        source.to(torch.float32)  # a fresh buffer (4 MiB by default), freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if sys.argv[1] == "reuse":
    with allocator_policy(REUSE_FREED_BUFFERS) as applied:
        assert applied
        print(faults())
elif sys.argv[1] == "restored":
    with allocator_policy(REUSE_FREED_BUFFERS):
        faults()
    # 16 MiB buffers: larger than any free block the 4 MiB ones left in the heap, so where they come from is the
    # thresholds' choice alone (a free block that fits is reused whatever the thresholds)
    print(faults(1 << 22))
else:
    print(faults())
"""


def _faults(mode: str) -> int:
    env = {"THP_MEM_ALLOC_ENABLE": "1", "PATH": ""}  # as the mtool executable sets it
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reusing_freed_buffers_avoids_a_page_fault_per_page_and_is_undone_after() -> None:
    default, reused, restored = _faults("default"), _faults("reuse"), _faults("restored")
    # torch's huge-page-aligned allocations are mapped afresh each time by default: ~1024 faults per buffer
    assert default > 300 * 1024 * 0.4
    assert reused < default / 5  # the heap serves them again (a few fresh pages when it grows or moves)
    # glibc's initial thresholds are back: every 16 MiB block is mapped afresh (fresh pages, however many the
    # kernel's page size makes them), where the reused heap had none to fault in
    assert restored >= 300 and reused < restored / 5
