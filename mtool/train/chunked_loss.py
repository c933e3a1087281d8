"""Linear + cross-entropy in chunks of tokens: the loss of a causal LM without its ``[tokens, vocabulary]`` logits.

For hidden states ``H`` (``T x h``, the output of the final norm), the output head ``W`` (``V x h``), labels
``y_t`` (``-100``: not trained), an optional soft cap ``c`` and the normalizer ``N`` (the trained tokens of the
whole optimizer step, see :mod:`mtool.train.loop`):

    z_t = H_t W^T                       (c: z_t = c tanh(H_t W^T / c))
    loss = (1 / N) sum_{t: y_t != -100} (logsumexp(z_t) - z_t[y_t])
    dloss/dz_t = (softmax(z_t) - onehot(y_t)) / N      (c: times 1 - tanh^2)
    dloss/dH_t = (dloss/dz_t) W       dloss/dW = sum_t (dloss/dz_t)^T H_t   (only when W trains)

Only the trained positions are computed at all (a prompt-masked SFT batch spends no head FLOPs on its
prompts), a chunk of them at a time (:func:`chunk_rows`): the logits of a chunk are made in the compute dtype,
upcast to float32 (as transformers' loss does), turned in place into the loss and the gradients above, and
dropped before the next chunk.
The gradients are computed in the forward pass, so the backward pass only scales them by the incoming
gradient; what is kept for it is ``dloss/dH`` of the trained positions (``h`` values per token) instead of the
float32 log-probabilities (``V`` per token) that ``torch.nn.functional.cross_entropy`` keeps. The head
matmuls are the same as the full-logits path: one forward product and one for ``dloss/dH`` per chunk.

On CUDA with ``liger-kernel`` installed, Liger's fused linear cross-entropy computes the same thing in Triton
(:func:`causal_lm_loss` picks it); this module is the path everywhere else.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


MIN_ROWS = 128  # narrower products run the head's matmul several times slower (CPU and GPU alike)


def chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: a chunk's logits take about as much memory as the hidden states of all ``tokens``
    (``ceil(V / h)`` chunks, rounded up to a power of two rows), but at least ``MIN_ROWS`` rows (fewer if there
    are fewer tokens)."""
    chunks = max(1, math.ceil(vocab / max(1, hidden)))
    rows = 1 << max(0, math.ceil(tokens / chunks) - 1).bit_length()
    return max(1, min(tokens, max(MIN_ROWS, rows)))


def _chunk_terms(hidden: "torch.Tensor", weight: "torch.Tensor", labels: "torch.Tensor", softcap: float | None,
                 with_gradient: bool) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """The summed loss of one chunk and, when asked, ``dloss/dz`` (times N), both in float32 (float64 for float64
    inputs). One ``rows x V`` buffer (two with a soft cap): the logits become the softmax in place."""
    import torch

    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    capped = None
    if softcap is not None:
        capped = logits.div_(softcap).tanh_()
        logits = capped * softcap
    target = logits.gather(1, labels[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(top).exp_()  # in place: the logits are not needed any more
    total = exp.sum(dim=-1, keepdim=True)
    loss = (top.squeeze(1) + total.squeeze(1).log() - target).sum()
    if not with_gradient:
        return loss, None
    gradient = exp.div_(total)  # softmax
    gradient[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
    if capped is not None:
        gradient.mul_(1.0 - capped * capped)
    return loss, gradient


def _linear_cross_entropy_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Inputs: the trained positions' hidden states and labels (every label valid), the head weight, N."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, normalizer, softcap, rows):
            wide = torch.promote_types(hidden.dtype, torch.float32)
            total = torch.zeros((), dtype=wide, device=hidden.device)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if weight.requires_grad else None
            for start in range(0, hidden.shape[0], rows):
                part = slice(start, start + rows)
                loss, gradient = _chunk_terms(hidden[part], weight, labels[part], softcap, with_gradient=True)
                total += loss
                gradient = gradient.div_(normalizer)
                grad_hidden[part] = gradient.to(hidden.dtype) @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(gradient.t(), hidden[part].to(wide))
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return total / normalizer

        @staticmethod
        def backward(ctx, grad_loss):
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_loss.to(grad_hidden.dtype)
            grad_h = grad_hidden * scale if ctx.needs_input_grad[0] else None
            grad_w = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
            return grad_h, grad_w, None, None, None, None

    return LinearCrossEntropy


@functools.cache
def linear_cross_entropy_function() -> Any:
    return _linear_cross_entropy_function()


def linear_cross_entropy(hidden: "torch.Tensor", weight: "torch.Tensor", labels: "torch.Tensor", *,
                         normalizer: float, softcap: float | None = None, rows: int | None = None) -> "torch.Tensor":
    """``(1/N) sum_t CE(H_t W^T, y_t)`` over positions with ``y_t != -100`` (``hidden``: ``[T, h]``, ``labels``:
    ``[T]``), without the ``[T, V]`` logits; see the module docstring."""
    import torch

    trained = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    selected = hidden.index_select(0, trained)
    targets = labels.index_select(0, trained)
    rows = rows or chunk_rows(max(1, selected.shape[0]), weight.shape[0], weight.shape[1])
    if selected.shape[0] == 0:
        return (selected.sum() + weight.sum()) * 0.0  # zero, still connected to the graph
    if not torch.is_grad_enabled() or not (selected.requires_grad or weight.requires_grad):
        total = sum(_chunk_terms(selected[start: start + rows], weight, targets[start: start + rows], softcap,
                                 with_gradient=False)[0] for start in range(0, selected.shape[0], rows))
        return total / normalizer
    return linear_cross_entropy_function().apply(selected, weight, targets, float(normalizer), softcap, rows)


def shifted_labels(labels: "torch.Tensor") -> "torch.Tensor":
    """The next-token targets of each position: ``labels[:, 1:]`` with ``-100`` after the last (transformers'
    ``ForCausalLMLoss`` shift), flattened."""
    import torch

    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)
