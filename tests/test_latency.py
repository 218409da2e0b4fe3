"""scope.latency: repeated timings and their summary (median and spread)."""

from __future__ import annotations

import pytest
import torch

from scope import latency as L


@pytest.mark.parametrize(
    "times, median, lo, hi",
    [
        ([3.0, 1.0, 2.0, 5.0, 4.0], 3.0, 1.0, 5.0),  # odd count: the middle value
        ([4.0, 1.0, 3.0, 2.0], 2.5, 1.0, 4.0),  # even count: the mean of the two middle values
        ([7.0], 7.0, 7.0, 7.0),
    ],
)
def test_spread_is_median_fastest_slowest(times, median, lo, hi):
    assert L.spread(times) == {"median": median, "lo": lo, "hi": hi, "n": len(times)}


def test_spread_refuses_no_timings():
    with pytest.raises(ValueError, match="empty"):
        L.spread([])


def test_timed_repeats_measures_separately_each_time():
    calls = []
    times = L.timed_repeats(lambda: calls.append(1), torch.device("cpu"), min_run_time=0.001, repeats=5)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert len(calls) >= 5  # at least one call per repeat
    with pytest.raises(ValueError, match="repeats"):
        L.timed_repeats(lambda: None, torch.device("cpu"), 0.001, repeats=0)
