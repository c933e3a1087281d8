"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (https://arxiv.org/abs/2601.13572).

Both split the entries of the task vectors ``T_i = W_i - base`` by how many models change them: an entry is
*contributed* by model i when ``|T_i| > epsilon``; with ``c`` the number of contributing models, an entry is
*unique* (``c == 1``) or *shared* (``c > 1``).

* ``ram``: unique entries keep their full value, shared entries take the mean of the contributing models:
  ``W = base + sum_i [ T_i [|T_i| > eps] ([c == 1] + [c > 1] / c) ]``;
* ``ramplus_tl``: additionally scales each model's unique entries by ``lambda_i = 1 + r clamp(rho_i, 0, alpha)``
  with ``rho_i = shared_i / max(unique_i, epsilon)``, the counts of model i's shared and unique entries in this
  tensor ("tensor-local"). ``lambda`` is float32, so for 16-bit inputs the result is float32 (mergekit writes it
  so unless ``out_dtype`` says otherwise).

Entries no model changes by more than ``epsilon`` stay exactly the base's.
"""

from __future__ import annotations

import torch

from mtool.merger.methods.base import BasePolicy, MergeMethod, MergeTask, ParameterSpec, Scope


def _contributions(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float):
    """Flattened task vectors, which entries each model contributes, and per entry how many do."""
    task_vectors = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    contributes = task_vectors.abs() > epsilon
    counts = contributes.sum(dim=0, keepdim=True)
    return task_vectors, contributes, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, tensors: list[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM (see the module docstring), in the inputs' dtype."""
    if not tensors:
        return base
    vectors, contributes, counts, shared, unique = _contributions(base, tensors, epsilon)
    kept = vectors * contributes
    merged = ((kept * unique) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(base: torch.Tensor, tensors: list[torch.Tensor], *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+ tensor-local (see the module docstring)."""
    if not tensors:
        return base
    vectors, contributes, counts, shared, unique = _contributions(base, tensors, epsilon)
    shared_counts = (contributes & shared).sum(dim=1)
    unique_counts = (contributes & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)
    kept = vectors * contributes
    merged = ((kept * unique * scale.unsqueeze(-1)) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def _members(task: MergeTask) -> list[torch.Tensor]:
    return [tensor for tensor, _ in task.non_base()]


RAM = MergeMethod(
    name="ram",
    function=lambda task: ram(task.base, _members(task), epsilon=float(task.params["epsilon"])),
    parameters=(ParameterSpec("epsilon", float, Scope.SHARED, 1e-5, 0.0,
                              help="an entry counts as changed by a model when |W_i - base| exceeds it"),),
    base=BasePolicy.REQUIRED,
    description="unique changes kept, shared changes averaged over the models that make them",
    reference="https://arxiv.org/abs/2601.13572",
)

RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    function=lambda task: ramplus_tl(task.base, _members(task), r=float(task.params["r"]),
                                     alpha=float(task.params["alpha"]), epsilon=float(task.params["epsilon"])),
    parameters=(
        ParameterSpec("r", float, Scope.SHARED, 0.1, help="strength of the boost of a model's unique changes"),
        ParameterSpec("alpha", float, Scope.SHARED, 0.2, 0.0, help="largest shared/unique ratio counted"),
        ParameterSpec("epsilon", float, Scope.SHARED, 1e-5, 0.0,
                      help="an entry counts as changed by a model when |W_i - base| exceeds it"),
    ),
    base=BasePolicy.REQUIRED,
    result_float32=True,
    description="RAM with each model's unique changes boosted by its shared/unique ratio in the tensor",
    reference="https://arxiv.org/abs/2601.13572",
)
