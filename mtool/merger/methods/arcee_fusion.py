"""Arcee Fusion: take the other model's value where it changes the base in an important way.

For the base ``B`` and the other model ``X`` (in the inputs' dtype):

* ``importance = |X - B| * KL``, where ``KL = sum_j p_j log(p_j / q_j)`` along the last dimension with
  ``p = softmax(X) + 1e-8`` and ``q = softmax(B) + 1e-8`` (one value per row of a matrix, one for a vector);
* ``threshold = median + 1.5 (q3 - q1)`` of the importances, the quartiles read off the sorted importances at
  ``floor(q (n - 1))`` (q in float32). Tensors of more than 1,000,000 entries use a sample of 1,000,000 drawn
  with replacement, from this tensor's own seeded generator (mergekit draws from its global generator, so its
  result for such tensors changes from run to run);
* ``W = B + (X - B) * [importance >= threshold]``, the mask in float32: for 16-bit inputs the result is float32
  (mergekit writes it so unless ``out_dtype`` says otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask

QUANTILE_SAMPLE = 1_000_000


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|X - B|`` times the row's KL divergence of softmax(X) from softmax(B) (see the module docstring)."""
    difference = (other - base).abs()
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return difference * divergence


def fusion_threshold(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``median + 1.5 IQR`` of ``scores`` (a sample of 1,000,000 drawn from ``generator`` for larger tensors)."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    ordered, _ = torch.sort(flat)
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[positions.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The fused tensor (see the module docstring)."""
    scores = importance(other, base)
    mask = (scores >= fusion_threshold(scores, generator)).float()
    return base + (other - base) * mask


def arcee_fusion_merge(task: MergeTask) -> torch.Tensor:
    (other, _), = task.non_base()
    return arcee_fusion(task.base, other, task.generator)


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    function=arcee_fusion_merge,
    base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2,
    random=True,  # only tensors of more than 1,000,000 entries draw (a sample for the quartiles)
    result_float32=True,
    description="the other model's values where |difference| x KL(softmax) is an upper outlier",
    reference="https://arcee.ai",
)
