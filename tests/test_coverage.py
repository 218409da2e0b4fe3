import pytest
import torch

import scope
from scope.coverage import coverage_gain, token_coverage


def brute_cov(x, kept):
    n = x.shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    for u in range(n):
        best = 0.0
        for t in kept:
            c = float(torch.dot(x[u], x[t]) / (x[u].norm() * x[t].norm()))
            best = max(best, c)
        out[u] = best
    return out


def test_token_coverage_matches_the_definition():
    x = torch.randn(20, 6, dtype=torch.float64)
    kept = [0, 5, 7]
    torch.testing.assert_close(token_coverage(x, torch.tensor(kept)), brute_cov(x, kept))
    assert float(scope.set_coverage(x, torch.tensor(kept))) == pytest.approx(float(brute_cov(x, kept).sum()))


def test_empty_and_full_sets():
    x = torch.randn(2, 16, 4)
    assert torch.all(scope.set_coverage(x, torch.empty(2, 0, dtype=torch.long)) == 0)
    full = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(scope.set_coverage(x, full), torch.full((2,), 16.0))
    assert torch.all(scope.theta_coverage(x, full, 0.999) == 1)


def test_theta_coverage_is_a_decreasing_fraction():
    x = torch.randn(3, 50, 8)
    kept = scope.select(x, None, 10, method="coverage")
    thetas = torch.linspace(-1, 1, 21)
    curve = scope.theta_coverage(x, kept, thetas)
    assert curve.shape == (3, 21)
    assert torch.all(curve[:, 1:] <= curve[:, :-1])
    assert torch.all(curve[:, 0] == 1) and torch.all((curve >= 0) & (curve <= 1))
    # the kept tokens cover themselves at any theta <= 1
    assert torch.all(curve[:, -1] >= 10 / 50 - 1e-6)
    single = scope.theta_coverage(x, kept, 0.5)
    torch.testing.assert_close(single, curve[:, 15])


def test_gain_is_diminishing():
    x = torch.randn(30, 5)
    small, large = torch.tensor([1]), torch.tensor([1, 2, 3, 4])
    assert float(coverage_gain(x, small, 9)) >= float(coverage_gain(x, large, 9)) - 1e-6


def test_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="kept indices"):
        scope.set_coverage(x, torch.tensor([11]))
    with pytest.raises(ValueError, match="theta"):
        scope.theta_coverage(x, torch.tensor([1]), torch.ones(2, 2))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        scope.set_coverage(bad, torch.tensor([1]))


def test_coverage_gain_from_the_empty_set_is_the_candidates_own_coverage():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])  # cos with token 0: 1, 0.6, -1 (clipped to 0)
    empty = torch.tensor([], dtype=torch.long)
    assert float(coverage_gain(x, empty, 0)) == pytest.approx(1.6, abs=1e-6)
    assert float(coverage_gain(x, [], 2)) == pytest.approx(1.0, abs=1e-6)  # only itself
