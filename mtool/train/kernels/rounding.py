"""Rounding to bfloat16 the way a GPU does (to nearest, ties to even), for Triton's interpreter, whose
float32 -> bfloat16 conversion truncates: under it the kernels round with :func:`round_to_bfloat16` first, so
the interpreter computes the numbers the GPU computes."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(x):
    """The float32 nearest to ``x`` that bfloat16 represents (ties to even); finite inputs."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)
