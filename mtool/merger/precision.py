"""The dtypes of one output tensor: what its inputs are read as, what its method computes in, what is written.

mergekit 0.1.5 rounds every input to the recipe's ``dtype`` when it reads it, promotes the inputs of a tensor to
their common dtype (bfloat16 with float16 gives float32) and hands them to the method, which computes in that
*working dtype* (linear and SLERP in float32, float64 for float64 inputs); the result is written in the
recipe's ``out_dtype``, else as the method returns it: the working dtype, except for arcee_fusion and ramplus_tl,
whose float32 masks make a float32 result for 16-bit inputs. mtool does the same by default. With ``mtool: {math:
float32}`` every method computes in float32 (float64 for float64 inputs) and the result is rounded once to
``out_dtype``, else to the working dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mtool.merger.methods.base import MergeMethod


def working_dtype(read_dtype: "torch.dtype | None", input_dtypes: Iterable["torch.dtype"]) -> "torch.dtype":
    """The recipe's ``dtype`` when it has one, else the inputs' common dtype."""
    import torch

    if read_dtype is not None:
        return read_dtype
    dtypes = list(input_dtypes)
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def _float32_or_wider(dtype: "torch.dtype") -> "torch.dtype":
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(method: "MergeMethod", working: "torch.dtype", math: str) -> "torch.dtype":
    """The dtype the method's inputs are handed over in."""
    if math == "float32" or method.internal_float32:
        return _float32_or_wider(working)
    return working


def result_dtype(method: "MergeMethod", working: "torch.dtype", math: str,
                 out_dtype: "torch.dtype | None") -> "torch.dtype":
    """The dtype the output tensor is written in."""
    import torch

    if out_dtype is not None:
        return out_dtype
    if math != "float32" and method.result_float32:
        return torch.promote_types(working, torch.float32)
    return working
