"""Every merge method against an independent float64 implementation of its formula, written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtool.errors import ConfigError
from mtool.merger.methods import METHODS, get_method
from mtool.merger.methods.base import MergeTask

SHAPES = [(48,), (24, 40)]


def _tensors(count: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    others = [base + 0.3 * torch.randn(shape, generator=generator) for _ in range(count - 1)]
    return [t.double() for t in [base, *others]]  # float32 values, so the float32 math sees them exactly


def _run(method: str, inputs: list[torch.Tensor], model_params: list[dict], params: dict | None = None,
         base_index: int | None = None, seed: int | None = None) -> torch.Tensor:
    spec = get_method(method)
    resolved = {p.name: p.default for p in spec.parameters if p.scope.value == "shared" and not p.required}
    resolved.update(params or {})
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    task = MergeTask(name="t", inputs=[t.float() for t in inputs], model_params=model_params, params=resolved,
                     base_index=base_index, generator=generator, seed=seed)
    return spec.merge(task).double()


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-6) -> None:
    error = (actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)
    assert error <= tolerance, f"relative error {error:.2e}"


def _topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * x.numel()))
    order = torch.argsort(x.abs().reshape(-1), descending=True)
    mask = torch.zeros(x.numel(), dtype=torch.float64)
    mask[order[:k]] = 1
    return mask.reshape(x.shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_linear(shape) -> None:
    xs = _tensors(3, shape)
    w = [0.2, 0.5, 0.9]
    expected = sum(wi * xi for wi, xi in zip(w, xs)) / sum(w)
    _close(_run("linear", xs, [{"weight": v} for v in w]), expected)
    _close(_run("linear", xs, [{"weight": v} for v in w], {"normalize": False}), expected * sum(w))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp(shape, t) -> None:
    v0, v1 = _tensors(2, shape)
    a, b = v0.reshape(-1), v1.reshape(-1)
    omega = math.acos((a @ b / (a.norm() * b.norm())).item())
    expected = (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
    _close(_run("slerp", [v0, v1], [{}, {}], {"t": t}, base_index=0), expected)
    # the base may stand second: t still runs from the base to the other model
    _close(_run("slerp", [v1, v0], [{}, {}], {"t": t}, base_index=1), expected)


def test_slerp_statistics_are_the_same_whether_chunks_are_kept_or_read_again(monkeypatch) -> None:
    """A large tensor is read twice for its statistics (norms, then dot products), a small one keeps its chunks:
    the coefficients must not depend on which, bit for bit (small chunks and blocks make the passes real)."""
    from mtool.merger.chunks import ChunkedTensor, InMemory
    from mtool.merger.methods import spherical

    monkeypatch.setattr(spherical, "SLERP_BLOCK", 64)
    v0, v1 = (t.float() for t in _tensors(2, (24, 40)))
    tensor = ChunkedTensor(name="w", inputs=[InMemory(v0), InMemory(v1)], model_params=[{}, {}], params={"t": 0.3},
                           base_index=0, compute_dtype=torch.float32, chunk_size=100)
    kept = spherical.slerp_prepare(tensor)
    monkeypatch.setattr(spherical, "SLERP_KEEP_ELEMENTS", 0)
    read_again = spherical.slerp_prepare(tensor)
    assert torch.equal(kept.first, read_again.first) and torch.equal(kept.second, read_again.second)
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    omega = math.acos((a @ b / (a.norm() * b.norm())).item())
    assert float(kept.second) == pytest.approx(math.sin(0.3 * omega) / math.sin(omega), rel=1e-5)


def test_slerp_falls_back_to_lerp_for_parallel_vectors() -> None:
    v0 = torch.randn(64, dtype=torch.float64)
    v1 = 2.0 * v0
    _close(_run("slerp", [v0, v1], [{}, {}], {"t": 0.25}, base_index=0), 0.75 * v0 + 0.25 * v1)


def test_nuslerp_flattened_with_base_interpolates_task_vectors() -> None:
    base, x1, x2 = _tensors(3, (8, 6))
    d1, d2 = (x1 - base).reshape(-1), (x2 - base).reshape(-1)
    t = 0.75 / (0.25 + 0.75)
    omega = math.acos((d1 @ d2 / (d1.norm() * d2.norm())).item())
    expected = base + ((math.sin((1 - t) * omega) * d1 + math.sin(t * omega) * d2) / math.sin(omega)).reshape(8, 6)
    _close(_run("nuslerp", [x1, x2, base], [{"weight": 0.25}, {"weight": 0.75}, {}], base_index=2), expected)


def test_nuslerp_per_row() -> None:
    x1, x2 = _tensors(2, (5, 7), seed=3)
    expected = torch.empty(5, 7, dtype=torch.float64)
    for row in range(5):
        a, b = x1[row], x2[row]
        omega = math.acos((a @ b / (a.norm() * b.norm())).item())
        expected[row] = (math.sin(0.5 * omega) * a + math.sin(0.5 * omega) * b) / math.sin(omega)
    actual = _run("nuslerp", [x1, x2], [{"weight": 1.0}, {"weight": 1.0}], {"nuslerp_flatten": False})
    _close(actual, expected)


def test_multislerp_of_two_matches_slerp_direction_and_weighted_norm() -> None:
    x1, x2 = _tensors(2, (30,), seed=5)
    result = _run("multislerp", [x1, x2], [{"weight": 0.5}, {"weight": 0.5}])
    u1, u2 = x1 / x1.norm(), x2 / x2.norm()
    direction = (u1 + u2) / (u1 + u2).norm()  # the midpoint on the sphere
    _close(result, direction * (0.5 * x1.norm() + 0.5 * x2.norm()), 1e-5)


def test_karcher_mean_is_a_critical_point_of_the_geodesic_distance() -> None:
    xs = _tensors(4, (40,), seed=7)[1:]
    result = _run("karcher", xs, [{}, {}, {}], {"max_iter": 200, "tol": 1e-12})
    m = result / result.norm()
    units = [x / x.norm() for x in xs]
    gradient = sum(math.acos(min(1.0, (m @ u).item())) / math.sin(math.acos(min(1.0, (m @ u).item())))
                   * (u - (m @ u) * m) for u in units)
    assert gradient.norm() < 1e-4
    _close(result.norm().reshape(1), torch.tensor([sum(x.norm().item() for x in xs) / 3]), 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic(shape) -> None:
    base, x1, x2 = _tensors(3, shape)
    expected = base + 0.8 * (0.6 * (x1 - base) + 0.3 * (x2 - base))
    _close(_run("task_arithmetic", [base, x1, x2], [{}, {"weight": 0.6}, {"weight": 0.3}], {"lambda": 0.8},
                base_index=0), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_ties(shape) -> None:
    base, x1, x2, x3 = _tensors(4, shape, seed=11)
    weights, densities = [0.6, 0.3, 0.8], [0.5, 0.3, 0.9]
    deltas = [w * (x - base) * _topk_mask(x - base, d) for x, w, d in zip((x1, x2, x3), weights, densities)]
    elected = torch.where(sum(deltas) >= 0, 1.0, -1.0).double()
    masks = [(torch.sign(d) == elected).double() for d in deltas]
    mixed = sum(m * d for m, d in zip(masks, deltas))
    divisor = sum(m * w for m, w in zip(masks, weights))
    divisor[divisor == 0] = 1
    expected = base + mixed / divisor
    params = [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    _close(_run("ties", [base, x1, x2, x3], params, base_index=0), expected)


def test_breadcrumbs_drops_outliers_and_small_entries() -> None:
    base, x1 = _tensors(2, (20, 25), seed=2)
    delta = (x1 - base).reshape(-1)
    n = delta.numel()
    keep, top = int(0.5 * n), int(0.1 * n)
    order = torch.argsort(delta.abs())
    mask = torch.zeros(n, dtype=torch.float64)
    mask[order[n - keep - top:n - top]] = 1
    expected = base + (delta * mask).reshape(base.shape)
    params = [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}]
    _close(_run("breadcrumbs", [base, x1], params, base_index=0), expected)


def test_breadcrumbs_keeps_its_density_when_gamma_rounds_to_nothing() -> None:
    base, x1 = _tensors(2, (30,), seed=4)
    result = _run("breadcrumbs", [base, x1], [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.01}], base_index=0)
    assert int(((result - base).abs() > 0).sum()) == 15  # gamma * n < 1: no outlier removed, half kept


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_density_and_rescales_l1(method) -> None:
    base, x1 = _tensors(2, (200, 100), seed=6)
    delta = x1 - base
    result = _run(method, [base, x1], [{}, {"weight": 1.0, "density": 0.3}], base_index=0, seed=1)
    kept = result - base
    fraction = (kept.abs() > 0).double().mean().item()
    assert abs(fraction - 0.3) < 0.01
    _close(kept.abs().sum().reshape(1), delta.abs().sum().reshape(1), 1e-5)
    survivors = kept.abs() > 0
    factor = delta.abs().sum() / delta[survivors].abs().sum()  # one common rescale factor for the survivors
    torch.testing.assert_close(kept[survivors], factor * delta[survivors], rtol=0, atol=2e-6)
    again = _run(method, [base, x1], [{}, {"weight": 1.0, "density": 0.3}], base_index=0, seed=1)
    other = _run(method, [base, x1], [{}, {"weight": 1.0, "density": 0.3}], base_index=0, seed=2)
    assert torch.equal(result, again) and not torch.equal(result, other)


def test_della_keep_probability_grows_with_magnitude() -> None:
    base, x1 = _tensors(2, (400, 400), seed=8)
    result = _run("della_linear", [base, x1], [{}, {"weight": 1.0, "density": 0.4, "epsilon": 0.2}],
                  {"rescale": False}, base_index=0, seed=3)
    delta = (x1 - base)
    kept = (result - base).abs() > 0
    assert abs(kept.double().mean().item() - 0.4) < 0.01
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1)
    low = kept[ranks < 40].double().mean().item()  # expected keep rate ~0.2 + 0.4 * 20/399
    high = kept[ranks >= 360].double().mean().item()  # ~0.6 - 0.4 * 20/399
    assert abs(low - 0.22) < 0.03 and abs(high - 0.58) < 0.03


def test_della_rejects_a_window_outside_0_1() -> None:
    check = get_method("della").extra_checks[0]
    with pytest.raises(ConfigError, match="density"):
        check({}, [{"density": 0.9, "epsilon": 0.15}], "tensor")


def test_model_stock() -> None:
    base, x1, x2 = _tensors(3, (12, 9), seed=9)
    d1, d2 = (x1 - base).reshape(-1), (x2 - base).reshape(-1)
    cos = (d1 @ d2 / (d1.norm() * d2.norm())).item()
    t = 2 * cos / (1 + cos)
    expected = t * (x1 + x2) / 2 + (1 - t) * base
    _close(_run("model_stock", [base, x1, x2], [{}, {}, {}], base_index=0), expected)


def test_sce() -> None:
    base, x1, x2 = _tensors(3, (16, 10), seed=10)
    deltas = torch.stack([x1 - base, x2 - base])
    variance = deltas.var(dim=0, unbiased=False).reshape(-1)
    k = int(variance.numel() * 0.5)
    select = torch.zeros_like(variance)
    select[torch.argsort(variance, descending=True)[:k]] = 1
    deltas = deltas * select.reshape(16, 10)
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).double()
    masks = (torch.sign(deltas) == elected).double()
    energy = deltas.square().reshape(2, -1).mean(1)
    weights = (energy / energy.sum()).reshape(2, 1, 1) * masks
    expected = base + (deltas * weights).sum(0) / weights.sum(0).clamp(min=1e-6)
    _close(_run("sce", [base, x1, x2], [{}, {}, {}], {"select_topk": 0.5}, base_index=0), expected)


def test_nearswap_and_passthrough() -> None:
    base, x1 = _tensors(2, (50,), seed=12)
    weight = (0.1 / (base - x1).abs().clamp(min=1e-6)).clamp(0, 1)
    _close(_run("nearswap", [base, x1], [{}, {}], {"t": 0.1}, base_index=0), weight * x1 + (1 - weight) * base)
    _close(_run("passthrough", [x1], [{"scale": 0.5}]), 0.5 * x1)
    _close(_run("passthrough", [x1], [{"scale": None}]), x1)


def test_chunked_merges_equal_whole_tensor_merges() -> None:
    from mtool.merger.chunks import ChunkedTensor, InMemory

    base, x1, x2 = _tensors(3, (300, 170), seed=13)
    for method, params in (("ties", {"weight": 0.7, "density": 0.3}), ("dare_ties", {"weight": 0.7, "density": 0.3}),
                           ("slerp", {})):
        spec = get_method(method)
        shared = {p.name: p.default for p in spec.parameters if p.scope.value == "shared" and not p.required}
        shared.setdefault("t", 0.4)
        inputs = [base.float(), x1.float(), x2.float()] if method != "slerp" else [base.float(), x1.float()]
        per_model = [{}] + [params] * (len(inputs) - 1)
        whole = spec.merge(MergeTask(name="w", inputs=inputs, model_params=per_model, params=shared, base_index=0,
                                     seed=5))
        chunked = ChunkedTensor(name="w", inputs=[InMemory(t) for t in inputs], model_params=per_model,
                                params=shared, base_index=0, compute_dtype=torch.float32, chunk_size=7919, seed=5)
        prepared = spec.prepare(chunked)
        pieces = torch.cat([spec.map_chunk(chunked.task(s), prepared) for s in chunked.starts()])
        _close(pieces.double(), whole.reshape(-1).double(), 1e-6)


def test_registry_knows_every_mergekit_method_and_rejects_others() -> None:
    assert set(METHODS) == {"linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties",
                            "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                            "model_stock", "sce", "nearswap", "passthrough", "arcee_fusion", "ram", "ramplus_tl"}
    with pytest.raises(ConfigError, match="unknown merge method 'tie'"):
        get_method("tie")


def test_input_counts_and_base_are_checked() -> None:
    with pytest.raises(ConfigError, match="exactly 2 models"):
        get_method("slerp").check_inputs(3, True, where="models")
    with pytest.raises(ConfigError, match="needs a base_model"):
        get_method("ties").check_inputs(2, False, where="models")
    with pytest.raises(ConfigError, match="at least 3"):
        get_method("model_stock").check_inputs(2, True, where="models")


@pytest.mark.parametrize("offset, count, density", [(0, 5, 0.5), (3, 70_000, 0.3), (65_535, 2, 0.9),
                                                    (131_071, 65_539, 0.123456789), (10, 40, 0.99999999)])
def test_dare_keep_masks_are_numpys_float32_uniforms_below_density(offset, count, density) -> None:
    """The keep mask compares raw 32-bit draws; the reference draws numpy's float32 uniforms of each
    position's block generator and compares them with the density in float32."""
    import numpy as np

    from mtool.merger.methods.sparsify import RANDOM_BLOCK, position_keep_mask
    from mtool.seeding import hashed_seed

    seed, member = 11, 1
    blocks = range(offset // RANDOM_BLOCK, (offset + count - 1) // RANDOM_BLOCK + 1)
    uniforms = np.concatenate([np.random.Generator(np.random.PCG64(hashed_seed(seed, member, block)))
                               .random(RANDOM_BLOCK, dtype=np.float32) for block in blocks])
    first = offset - blocks[0] * RANDOM_BLOCK
    expected = uniforms[first:first + count] < np.float32(density)
    mask = position_keep_mask(seed, member, offset, count, density)
    assert mask.dtype == torch.uint8 and mask.shape == (count,)
    assert np.array_equal(mask.numpy().astype(bool), expected)
    assert position_keep_mask(seed, member, offset, count, 0.0).sum() == 0
    assert position_keep_mask(seed, member, offset, count, 1.0).sum() == count


def test_32_bit_draws_split_the_same_way_on_any_byte_order(monkeypatch) -> None:
    import sys

    import numpy as np

    from mtool.merger.methods.sparsify import _low_then_high_halves

    outputs = np.random.Generator(np.random.PCG64(3)).bit_generator.random_raw(1001)
    native = _low_then_high_halves(outputs).copy()
    monkeypatch.setattr(sys, "byteorder", "little" if sys.byteorder == "big" else "big")
    assert np.array_equal(_low_then_high_halves(outputs), native)
    assert native[0] == outputs[0] & 0xFFFFFFFF and native[1] == outputs[0] >> 32


def test_ram_keeps_unique_changes_and_averages_shared_ones() -> None:
    base = torch.zeros(2, 5, dtype=torch.float64)
    x1 = torch.tensor([[0.5, 0.0, 0.2, 1e-6, -0.3], [0.0, 0.1, 0.0, 0.4, 0.0]], dtype=torch.float64)
    x2 = torch.tensor([[0.1, 0.0, 0.6, 0.0, 0.3], [0.0, 0.0, 0.0, 0.2, 0.7]], dtype=torch.float64)
    eps = 1e-5
    expected = torch.zeros_like(base)
    for index in range(base.numel()):  # per entry, in float64: the contributing models' mean, or the one change
        values = [t.reshape(-1)[index].item() for t in (x1, x2) if abs(t.reshape(-1)[index].item()) > eps]
        expected.view(-1)[index] = sum(values) / len(values) if values else 0.0
    _close(_run("ram", [base, x1, x2], [{}, {}, {}], {"epsilon": eps}, base_index=0), expected, 1e-7)


def test_ramplus_tl_boosts_each_models_unique_changes() -> None:
    base, x1, x2 = _tensors(3, (30, 20), seed=14)
    eps, r, alpha = 0.25, 0.1, 0.2
    deltas = [x1 - base, x2 - base]
    contributes = [d.abs() > eps for d in deltas]
    count = sum(c.double() for c in contributes)
    expected = base.clone()
    for delta, own in zip(deltas, contributes):
        shared = int((own & (count > 1)).sum())
        unique = int((own & (count == 1)).sum())
        rho = shared / max(unique, eps)
        boost = 1 + r * min(max(rho, 0.0), alpha)
        expected += torch.where(own & (count == 1), delta * boost, 0.0)
        expected += torch.where(own & (count > 1), delta / count.clamp(min=1), 0.0)
    result = _run("ramplus_tl", [base, x1, x2], [{}, {}, {}], {"r": r, "alpha": alpha, "epsilon": eps}, base_index=0)
    _close(result, expected, 1e-6)


def test_ramplus_tl_and_arcee_fusion_write_float32_for_bf16_inputs() -> None:
    base, x1 = (t.bfloat16() for t in _tensors(2, (8, 6), seed=15))
    for method in ("ramplus_tl", "arcee_fusion"):
        spec = get_method(method)
        params = {p.name: p.default for p in spec.parameters}
        result = spec.merge(MergeTask(name="t", inputs=[base, x1], model_params=[{}, {}], params=params,
                                      base_index=0))
        assert result.dtype == torch.float32 and spec.result_float32


def test_arcee_fusion_takes_the_important_changes() -> None:
    base, x1 = _tensors(2, (40, 16), seed=16)
    x1[3, :] = base[3, :] * 6.0  # one row changed a lot: its KL and differences make it the upper outlier
    difference = (x1 - base).abs()
    p = torch.softmax(x1, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = difference * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(np.float32(f) * (n - 1))] for f in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).double()
    expected = base + (x1 - base) * mask
    result = _run("arcee_fusion", [base, x1], [{}, {}], {}, base_index=0)
    _close(result, expected, 1e-6)
    assert torch.allclose(result[3], x1[3], atol=1e-5) and mask.sum() < mask.numel() / 4  # B + (X - B)
