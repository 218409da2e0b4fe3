"""Properties of the selection methods (scope.select): not shapes alone, but what each method promises."""

import importlib
import itertools
import math

import pytest
import torch

import scope
from scope.coverage import set_coverage
from scope.methods import PRE_LLM, names
from scope.select import (
    cosine_similarity_matrix,
    scope_greedy_fast,
    scope_greedy_reference,
    uniform_indices,
    visionzip_counts,
)

scope_select = importlib.import_module("scope.select")  # the module: scope.select is also the function


def clustered(b, n, d, k=6, noise=0.05, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, d, generator=g)
    assign = torch.randint(0, k, (b, n), generator=g)
    x = centres.gather(1, assign[..., None].expand(-1, -1, d)) + noise * torch.randn(b, n, d, generator=g)
    return x.to(dtype)


def inputs(b=2, n=49, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g, dtype=dtype), torch.rand(b, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("method", names(PRE_LLM))
def test_every_method_returns_k_unique_sorted_indices(method):
    feats, sal = inputs(b=3, n=49)
    for k in (1, 7, 49):
        idx = scope.select(feats, sal, budget=k, method=method)
        assert idx.shape == (3, k) and idx.dtype == torch.long
        for row in idx:
            assert torch.all(row[1:] > row[:-1]), "indices must be unique and ascending"
            assert 0 <= int(row.min()) and int(row.max()) < 49


@pytest.mark.parametrize("method", names(PRE_LLM))
def test_deterministic_and_batched_equals_per_sample(method):
    feats, sal = inputs(b=3, n=36)
    a = scope.select(feats, sal, budget=9, method=method)
    b = scope.select(feats, sal, budget=9, method=method)
    assert torch.equal(a, b)
    if method == "random":  # one generator per call: sample b of a batch is not the same draw as alone
        return
    for i in range(3):
        assert torch.equal(scope.select(feats[i], sal[i], budget=9, method=method), a[i])


def test_unbatched_in_unbatched_out():
    feats, sal = inputs(b=1, n=25)
    idx = scope.select(feats[0], sal[0], budget=5)
    assert idx.shape == (5,)
    p = scope.prune(feats[0], sal[0], budget=5)
    assert p.features.shape == (5, 16) and torch.equal(p.features, feats[0][p.indices])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("data", ["random", "clustered"])
@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("chunk", ["default", "tiny"])
def test_fast_greedy_picks_exactly_what_the_reference_picks(dtype, data, combine, chunk, monkeypatch):
    if chunk == "tiny":  # 4-row work buffer: every dense pass and most rescoring calls span many chunks
        monkeypatch.setattr(scope_select, "_CHUNK_ELEMENTS", 1)
    for seed in range(4):
        n = [50, 81, 100, 121][seed]
        if data == "random":
            feats, sal = inputs(b=3, n=n, d=24, seed=seed, dtype=dtype)
        else:
            feats = clustered(3, n, 24, seed=seed, dtype=dtype)
            feats[:, :4] = feats[:, 10:14]  # exact duplicates: ties the greedy must break the same way
            sal = torch.rand(3, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            sal[:, :4] = sal[:, 10:14]
        for k in (1, 3, n // 4, n - 2, n):
            ref = scope_greedy_reference(feats, sal, k, combine=combine)
            fast = scope_greedy_fast(feats, sal, k, combine=combine, dense_limit=0)  # force the lazy path
            assert torch.equal(ref, fast), (seed, k)
            one = scope_greedy_fast(feats[1:2], sal[1:2], k, combine=combine, dense_limit=0)  # 1-sample loop
            assert torch.equal(ref[1:2], one), (seed, k)
            batched = scope_greedy_fast(feats, sal, k, combine=combine, dense_limit=0, batched=True)
            assert torch.equal(ref, batched), (seed, k)
            assert torch.equal(scope.select(feats, sal, k, impl="reference", combine=combine), ref)


def test_fast_greedy_matches_reference_at_llava_size():
    feats = clustered(2, 576, 64, k=20, noise=0.5, seed=3)
    sal = (3 * torch.randn(2, 576, generator=torch.Generator().manual_seed(1))).softmax(-1)
    ref = scope_greedy_reference(feats, sal, 64)
    assert torch.equal(ref, scope_greedy_fast(feats, sal, 64))  # lazy, one sample after the other
    assert torch.equal(ref, scope_greedy_fast(feats, sal, 64, dense_limit=0))
    assert torch.equal(ref, scope_greedy_fast(feats, sal, 64, batched=True))  # B * N * N > 2**20: lazy
    # unstructured features, near-uniform saliency: bounds go stale together and steps settle many rows
    g = torch.Generator().manual_seed(4)
    feats, sal = torch.randn(2, 576, 256, generator=g), torch.rand(2, 576, generator=g).softmax(-1)
    ref = scope_greedy_reference(feats, sal, 64)
    assert torch.equal(ref, scope_greedy_fast(feats, sal, 64))
    assert torch.equal(ref, scope_greedy_fast(feats, sal, 64, batched=True))


def test_small_problems_go_to_the_reference_loop_and_larger_ones_sample_by_sample(monkeypatch):
    feats, sal = inputs(b=3, n=40)
    calls = []

    def lazy(sim, weight, budget, *args):
        calls.append(tuple(sim.shape))
        return torch.arange(budget)

    monkeypatch.setattr(scope_select, "_lazy_greedy_single", lazy)
    assert torch.equal(scope_greedy_fast(feats, sal, 5), scope_greedy_reference(feats, sal, 5))
    assert calls == []  # 40 * 40 <= 2**18
    assert scope_greedy_fast(feats, sal, 5, dense_limit=40 * 40 - 1).shape == (3, 5)
    assert calls == [(40, 40)] * 3  # on CPU: one sample after the other, each with its own matrix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [4, 5, 64])
def test_gains_into_adds_what_row_gains_adds_bit_for_bit(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    for n in (3, 9, 50, 131):
        sim = cosine_similarity_matrix(torch.randn(n, 16, generator=g, dtype=dtype))
        cover = sim[torch.randperm(n, generator=g)[: max(1, n // 5)]].amax(0)
        buf = sim.new_empty(rows, n)
        full = scope_select._row_gains(sim, cover)  # what the reference sums, all rows at once
        assert torch.equal(scope_select._gains_into(buf, sim, cover), full)
        for size in sorted({1, 2, 3, min(5, n), min(9, n), n // 2 + 1, n}):
            idx = torch.randperm(n, generator=g)[:size]
            assert torch.equal(scope_select._gains_into(buf, sim, cover, idx), full[idx]), (n, size)


@pytest.mark.parametrize("n", [1, 7, 144, 145, 300, 577])
def test_cosine_similarity_panels_are_the_symmetric_product(n):
    x = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(n))
    unit = torch.nn.functional.normalize(x, dim=-1)
    for block in (3, 64, 144):
        sim = cosine_similarity_matrix(x, block=block)
        assert torch.allclose(sim, unit @ unit.transpose(1, 2), atol=1e-6)
        if n > block:  # upper triangle multiplied, lower mirrored
            assert torch.equal(sim, sim.transpose(1, 2))


def test_ties_go_to_the_first_index_like_argmax():
    # all tokens identical: every step is a full tie, so the picks must be 0, 1, 2, ...
    feats = torch.ones(1, 10, 4)
    sal = torch.ones(1, 10)
    for impl in ("reference", "fast"):
        assert scope.select(feats, sal, 4, impl=impl).tolist() == [[0, 1, 2, 3]]
    assert scope_greedy_fast(feats, sal, 4, dense_limit=0).tolist() == [[0, 1, 2, 3]]
    # two identical copies of the best token: the first copy wins, as torch.argmax would pick it
    feats, sal = inputs(b=1, n=30, d=8, seed=5)
    best = int(scope.select(feats, sal, 1, impl="reference")[0, 0])
    feats[0, 2], sal[0, 2] = feats[0, best], sal[0, best]
    first = min(2, best)
    for impl in ("reference", "fast"):
        assert int(scope.select(feats, sal, 1, impl=impl)[0, 0]) == first
    assert int(scope_greedy_fast(feats, sal, 2, dense_limit=0)[0, 0]) == first
    assert saliency_argmax_is_first()


def saliency_argmax_is_first():
    sal = torch.tensor([[0.1, 0.9, 0.9, 0.2]])
    return (
        scope.select(torch.randn(4, 3), sal[0], 1, method="saliency").tolist()
        == [1]
        == [int(torch.argmax(sal))]
    )


def test_first_scope_pick_maximises_gain_times_saliency():
    feats, sal = inputs(b=1, n=40, d=8, seed=2)
    sim = cosine_similarity_matrix(feats[0])
    gain = sim.clamp(min=0).sum(1)  # nothing covered yet
    expected = int(torch.argmax(gain * sal[0]))
    assert expected in scope.select(feats, sal, 1).tolist()[0]


def test_alpha_zero_is_coverage_and_large_alpha_approaches_saliency():
    feats, sal = inputs(b=2, n=64, d=16, seed=1)
    assert torch.equal(
        scope.select(feats, sal, 12, alpha=0.0), scope.select(feats, None, 12, method="coverage")
    )
    sal = sal + 0.1  # keep saliency**alpha away from underflow
    top = scope.select(feats, sal, 8, method="saliency")
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) for a, b in zip(scope.select(feats, sal, 8, alpha=60.0), top)
    ]
    assert min(overlap) >= 7
    low = [
        len(set(a.tolist()) & set(b.tolist())) for a, b in zip(scope.select(feats, sal, 8, alpha=0.0), top)
    ]
    assert sum(overlap) > sum(low)


def test_greedy_coverage_is_within_1_minus_1_over_e_of_the_optimum():
    for seed in range(5):
        feats = clustered(1, 11, 5, k=4, noise=0.4, seed=seed)[0]
        k = 3
        greedy = float(set_coverage(feats, scope.select(feats, None, k, method="coverage")))
        best = max(float(set_coverage(feats, torch.tensor(c))) for c in itertools.combinations(range(11), k))
        assert greedy >= (1 - 1 / math.e) * best - 1e-6
        assert greedy <= best + 1e-6


def test_scope_covers_more_than_saliency_only():
    feats = clustered(4, 144, 32, k=12, noise=0.3, seed=7)
    # saliency concentrated on one cluster, as CLS attention concentrates on the main object
    sal = (feats @ feats[:, :1].transpose(1, 2)).squeeze(-1).softmax(-1)
    cov_scope = set_coverage(feats, scope.select(feats, sal, 16))
    cov_sal = set_coverage(feats, scope.select(feats, sal, 16, method="saliency"))
    assert torch.all(cov_scope > cov_sal)


def test_half_precision_is_computed_in_fp32_and_returns_input_dtype():
    feats, sal = inputs(b=2, n=49, d=16, seed=3)
    ref = scope.select(feats, sal, 10)
    for dtype in (torch.float16, torch.bfloat16):
        p = scope.prune(feats.to(dtype), sal.to(dtype), 10)
        assert p.features.dtype == dtype
        # rounding the inputs may change near-ties, but most picks survive
        assert (p.indices == ref).float().mean() > 0.6


def test_zero_norm_rows_do_not_produce_nan():
    feats, sal = inputs(b=1, n=25, d=8)
    feats[0, 3] = 0
    for method in names(PRE_LLM):
        p = scope.prune(feats, sal, 5, method=method)
        assert torch.isfinite(p.features).all()
    assert torch.isfinite(cosine_similarity_matrix(feats)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 0}, "budget"),
        ({"budget": 50}, "budget"),
        ({"budget": -3}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"method": "nope"}, "unknown method"),
        ({"alpha": 1.0, "combine": "max"}, "combine"),
        ({"seed": 3}, "unknown option"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    feats, sal = inputs(b=1, n=49)
    args = {"budget": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        scope.select(feats, sal, **args)


def test_bad_tensors_raise_value_error():
    feats, sal = inputs(b=2, n=16)
    bad = feats.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        scope.select(bad, sal, 4)
    bad_sal = sal.clone()
    bad_sal[0, 0] = float("inf")
    with pytest.raises(ValueError, match="saliency contains NaN or inf"):
        scope.select(feats, bad_sal, 4)
    with pytest.raises(ValueError, match="does not match"):
        scope.select(feats, sal[:, :10], 4)
    with pytest.raises(ValueError, match="needs a saliency"):
        scope.select(feats, None, 4, method="saliency")
    with pytest.raises(ValueError, match="non-negative"):
        scope.select(feats, sal - 1, 4)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        scope.select(feats[0, 0], None, 1)


def test_random_is_seeded():
    feats, _ = inputs(b=2, n=100)
    a = scope.select(feats, budget=10, method="random", seed=1)
    assert torch.equal(a, scope.select(feats, budget=10, method="random", seed=1))
    assert not torch.equal(a, scope.select(feats, budget=10, method="random", seed=2))


def test_uniform_spreads_over_the_grid():
    idx = uniform_indices(576, 64)
    rows, cols = idx // 24, idx % 24
    assert len(set(rows.tolist())) == 8 and len(set(cols.tolist())) == 8  # an 8 x 8 lattice
    assert len(set(uniform_indices(576, 500).tolist())) == 500
    assert uniform_indices(12, 6, grid=(3, 4)).unique().numel() == 6
    with pytest.raises(ValueError, match="grid"):
        uniform_indices(12, 4)


def test_divprune_greedily_maximises_the_minimum_distance():
    feats = clustered(1, 60, 8, k=5, noise=0.2, seed=4)
    idx = scope.select(feats, None, 5, method="divprune")[0]
    dist = 1 - cosine_similarity_matrix(feats[0])
    # five clusters, five picks: one per cluster, so every pair is far apart
    sub = dist[idx][:, idx] + torch.eye(5) * 9
    assert float(sub.min()) > float(dist.masked_fill(torch.eye(60, dtype=torch.bool), 9).min(1).values.max())


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest():
    feats, sal = inputs(b=2, n=64, d=8, seed=6)
    n_dom, n_ctx = visionzip_counts(16)
    assert (
        (n_dom, n_ctx) == (14, 2) and visionzip_counts(64) == (54, 10) and visionzip_counts(192) == (162, 30)
    )
    p = scope.prune(feats, sal, 16, method="visionzip")
    assert p.indices.shape == (2, 16) and p.features.shape == (2, 16, 8)
    for b in range(2):
        top = set(sal[b].argsort(descending=True)[:n_dom].tolist())
        assert top <= set(p.indices[b].tolist())
        dom_rows = [i for i, t in enumerate(p.indices[b].tolist()) if t in top]
        assert torch.equal(p.features[b, dom_rows], feats[b, p.indices[b, dom_rows]])
        # every non-kept token joined exactly one centre: centre + mean(joined) reproduces the merged rows
        centres = [t for t in p.indices[b].tolist() if t not in top]
        others = [t for t in range(64) if t not in top and t not in centres]
        unit = torch.nn.functional.normalize(feats[b], dim=-1)
        owner = (unit[others] @ unit[centres].T).argmax(1)
        for j, c in enumerate(centres):
            members = [others[i] for i in range(len(others)) if owner[i] == j]
            expect = feats[b, c] + (feats[b, members].mean(0) if members else 0)
            row = p.indices[b].tolist().index(c)
            torch.testing.assert_close(p.features[b, row], expect)


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make the host wait for the device (on a GPU): reading a scalar back,
    nonzero (its output size is data-dependent) and copies to the CPU."""

    SYNCING = {"_local_scalar_dense", "nonzero", "item"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        to_cpu = name in ("_to_copy", "copy_") and str((kwargs or {}).get("device", "")) == "cpu"
        self.count += name in self.SYNCING or to_cpu
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_greedy_picks_exactly_what_the_reference_picks(combine, dtype):
    for seed, (b, n) in enumerate([(3, 49), (2, 150), (1, 300)]):  # 150, 300: the panelled similarity
        feats = clustered(b, n, 24, seed=seed, dtype=dtype)
        sal = torch.rand(b, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        for k in (1, 7, n // 3):
            ref = scope_greedy_reference(feats, sal, k, combine=combine)
            assert torch.equal(scope_select.scope_greedy_dense(feats, sal, k, combine=combine), ref)
    feats = clustered(2, 36, 8)
    assert torch.equal(scope.select(feats, None, 5, method="coverage", impl="dense"),
                       scope.select(feats, None, 5, method="coverage", impl="reference"))  # fmt: skip


def test_dense_greedy_never_waits_for_the_device_whatever_the_budget():
    feats, sal = clustered(2, 64, 16), torch.rand(2, 64)
    counts = {}
    lazy = lambda f, a, k: scope_greedy_fast(f, a, k, dense_limit=0)  # noqa: E731 (the lazy loop at any size)
    for impl, fn in (("dense", scope_select.scope_greedy_dense), ("lazy", lazy)):
        for k in (4, 32):
            with _SyncCounter() as counter:
                fn(feats, sal, k)
            counts[impl, k] = counter.count
    # the dense loop reads nothing back; what it counts is the one input check (saliency >= 0)
    assert counts["dense", 4] == counts["dense", 32] <= 1
    assert counts["lazy", 32] > counts["lazy", 4] > 1  # it sees the lazy greedy's int(argmax) per step
    with _SyncCounter() as counter:
        scope_select.scope_greedy_dense(feats, None, 32, alpha=0.0)  # no saliency: nothing is read back
    assert counter.count == 0
