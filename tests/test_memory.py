"""The allocator settings of the streaming commands, checked by the page faults they save (in a subprocess:
the settings are process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
from mtool.memory import reuse_freed_buffers
if sys.argv[1] == "reuse":
    assert reuse_freed_buffers()
source = torch.ones(1 << 20, dtype=torch.bfloat16)
for _ in range(20):
    source.to(torch.float32)  # warm-up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(300):
    source.to(torch.float32)  # a fresh 4 MiB buffer, freed at once
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                            env={"THP_MEM_ALLOC_ENABLE": "1", "PATH": ""})  # as the CLI sets it
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reusing_freed_buffers_avoids_a_page_fault_per_page() -> None:
    default, reused = _faults("default"), _faults("reuse")
    # torch's huge-page-aligned allocations are mapped afresh each time by default: ~1024 faults per buffer
    assert default > 300 * 1024 * 0.4
    assert reused < default / 5  # the heap serves them again (a few fresh pages when it grows or moves)
