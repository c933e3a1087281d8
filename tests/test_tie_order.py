"""Magnitude selections keep exactly the requested number of entries, with mergekit's choice among equal
magnitudes (torch's CPU sort order), on bfloat16 task vectors full of equal magnitudes.

mergekit keeps ``argsort(|delta|, descending)[:k]`` (TIES), a window of ``sort(|delta|)`` (Model Breadcrumbs),
ranks from ``argsort(argsort(|delta|))`` (DELLA) and ``topk(var)`` (SCE). A rule "keep every entry at or above
the k-th largest magnitude" keeps more than k entries wherever magnitudes tie at the threshold, which bfloat16
task vectors do in nearly every tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtool.io.reading import open_checkpoint
from mtool.merger.methods import get_method, selection
from mtool.merger.methods.base import MergeTask, WholeTensor
from tests.support.parity_models import low_rank_finetune


@pytest.fixture(scope="module")
def task_vectors(tiny, tmp_path_factory) -> dict[str, list[torch.Tensor]]:
    """Per tensor of a bfloat16 model: the bfloat16 task vectors of three low-rank fine-tunes."""
    base = tiny.model("llama", num_layers=2, dtype=torch.bfloat16)
    root = tmp_path_factory.mktemp("ties")
    fine_tunes = [open_checkpoint(low_rank_finetune(base, root / f"ft{seed}", seed=seed)) for seed in (1, 2, 3)]
    plain = open_checkpoint(base)
    return {name: [plain.read(name), *(ft.read(name) for ft in fine_tunes)] for name in plain.names}


def _native(flag: bool, monkeypatch) -> None:
    if not flag:
        monkeypatch.setattr(selection, "native_available", lambda: False)
    elif not selection.native_available():
        pytest.skip("the compiled selection helper is not built")


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-sort"])
@pytest.mark.parametrize("keys", ["float32", "bfloat16"])
def test_sorted_prefixes_hold_torch_sort_sets(native, keys, monkeypatch) -> None:
    _native(native, monkeypatch)
    generator = np.random.default_rng(7)
    for trial in range(60):
        count = int(generator.integers(1, 40_000)) if trial % 6 else 250_000
        values = torch.from_numpy((generator.standard_normal(count) * 0.01).astype(np.float32))
        if trial % 3 == 0:
            values = torch.from_numpy(generator.integers(0, 9, count).astype(np.float32))  # few distinct values
        magnitudes = values.abs().to(getattr(torch, keys))
        stored = magnitudes.view(torch.int16).numpy().view(np.uint16) if keys == "bfloat16" else magnitudes.numpy()
        descending = bool(trial % 2)
        bounds = sorted(int(b) for b in generator.integers(0, count + 1, 2))
        order, ordered = selection.sorted_prefixes(stored.copy(), bounds, descending=descending,
                                                   dtype=magnitudes.dtype)
        reference = torch.sort(magnitudes.float(), descending=descending, stable=False).indices.numpy()
        for bound in bounds:
            assert set(order[:bound].tolist()) == set(reference[:bound].tolist())
        assert np.array_equal(np.sort(order.astype(np.int64)), np.arange(count))


@pytest.mark.parametrize("density", [0.5, 0.3, 0.9])
def test_ties_keeps_exactly_k_with_torch_tie_order(task_vectors, density) -> None:
    method = get_method("ties")
    straddled = 0
    for name, (base, *models) in task_vectors.items():
        per_model = [{}] + [{"weight": 1.0, "density": density}] * 3
        task = MergeTask(name=name, inputs=[base] + models, model_params=per_model,
                         params={"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False},
                         base_index=0)
        states = method.prepare(WholeTensor(task))
        for model, state in zip(models, states):
            magnitudes = (model - base).abs().reshape(-1).float()  # bfloat16 difference, as mergekit takes it
            k = max(1, int(density * magnitudes.numel()))
            reference = set(torch.argsort(magnitudes, descending=True)[:k].tolist())
            kept = state.kept
            at_or_above = torch.nonzero(magnitudes >= kept.threshold).reshape(-1).tolist()
            ours = set(at_or_above) - set(kept.dropped.tolist())
            assert len(ours) == k and ours == reference, name
            straddled += len(at_or_above) > k  # the rule ">= k-th largest" would have kept more
    assert straddled >= 0.8 * 3 * len(task_vectors)  # equal magnitudes at the threshold nearly everywhere


def test_breadcrumbs_keeps_exactly_its_window(task_vectors) -> None:
    from mtool.merger.methods.sparsify import magnitude_outliers

    for name, (base, model, *_rest) in task_vectors.items():
        delta = model - base
        count = delta.numel()
        kept = magnitude_outliers(delta, 0.7, 0.05)
        keep, top = int(0.7 * count), int(0.05 * count)
        bottom = max(0, count - keep - top)
        order = torch.sort(delta.abs().reshape(-1).float(), stable=False).indices[bottom:bottom + keep]
        mask = torch.zeros(count, dtype=torch.bool)
        mask[order] = True
        assert torch.equal(kept.reshape(-1), torch.where(mask, delta.reshape(-1), torch.zeros_like(delta.reshape(-1))))
        assert int(mask.sum()) == keep


def test_della_ranks_follow_torch_sort_and_the_formula(task_vectors) -> None:
    from mtool.merger.methods.sparsify import della_probabilities

    base, model, *_ = task_vectors["model.layers.0.mlp.down_proj.weight"]
    delta = model - base
    probabilities = della_probabilities(delta, 0.5, 0.2).double()
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1).double()  # torch's order among equal values
    width = delta.shape[1]
    reference = (0.5 - 0.2) + ranks / (width - 1) * 2 * 0.2  # float64 formula
    # mergekit computes ranks, their normalization and the probability in bfloat16: within a step of it
    assert (probabilities - reference).abs().max() <= 2 ** -8 + 2 * 0.2 * 2 ** -8
    ties = int((delta.abs()[0].unsqueeze(0) == delta.abs()[0].unsqueeze(1)).sum()) - width
    assert ties > 0  # the row holds equal magnitudes


def test_sce_selects_exactly_k_highest_variances(task_vectors) -> None:
    from mtool.merger.methods.sce import variance_selection

    for name, (base, *models) in task_vectors.items():
        deltas = torch.stack([m - base for m in models])
        mask = variance_selection(deltas, 0.4)
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * 0.4)
        assert int(torch.count_nonzero(mask)) == k, name
        expected = torch.zeros(variance.numel())
        expected[torch.topk(variance.abs().reshape(-1), k).indices] = 1
        assert torch.equal(mask.reshape(-1).float(), expected)


def test_adapter_combination_ties_keeps_exactly_k() -> None:
    """``adapters combine --method merge:ties``: the same selection on float32 updates with equal magnitudes."""
    from mtool.adapters.combine_weightspace import WeightSpaceMerge

    generator = torch.Generator().manual_seed(3)
    update = torch.randint(-6, 7, (48, 40), generator=generator).float() / 8  # 13 distinct values: many ties
    combination = WeightSpaceMerge(method_name="ties", weights=(1.0,), density=0.45)
    merged = combination.merged_delta("model.layers.0.mlp.up_proj.weight", torch.zeros_like(update), [update], seed=0)
    k = int(0.45 * update.numel())
    expected = torch.zeros(update.numel())
    keep = torch.argsort(update.abs().reshape(-1), descending=True)[:k]
    expected[keep] = update.reshape(-1)[keep]
    assert torch.equal(merged.reshape(-1), expected)
    assert int((update.abs() >= update.abs().reshape(-1)[keep].min()).sum()) > k  # ties at the threshold
