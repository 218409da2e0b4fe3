"""Figures of the results notebooks (scope.vis_results): what the pictures show, not just that they exist."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from scope import vis, vis_results


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_latency_figure_draws_median_and_spread_per_method():
    rows = [
        {"method": "none", "budget": 576, "visual_avg": 576.0, "prefill_ms": 20.0, "prefill_ms_lo": 19.0,
         "prefill_ms_hi": 22.0, "select_ms": float("nan"), "select_ms_lo": float("nan"), "select_ms_hi": float("nan")},
        {"method": "scope", "budget": 64, "visual_avg": 64.0, "prefill_ms": 10.0, "prefill_ms_lo": 9.0,
         "prefill_ms_hi": 12.0, "select_ms": 2.0, "select_ms_lo": 1.5, "select_ms_hi": 3.0},
        {"method": "scope", "budget": 128, "visual_avg": 128.0, "prefill_ms": 14.0, "prefill_ms_lo": 13.0,
         "prefill_ms_hi": 15.0, "select_ms": 2.8, "select_ms_lo": 2.0, "select_ms_hi": 3.5},
        {"method": "fastv", "budget": 64, "visual_avg": 320.0, "prefill_ms": 18.0, "prefill_ms_lo": 17.0,
         "prefill_ms_hi": 19.0, "select_ms": float("nan"), "select_ms_lo": float("nan"), "select_ms_hi": float("nan")},
    ]  # fmt: skip
    fig = vis_results.plot_latency(pd.DataFrame(rows))
    left, right = fig.axes
    curves = {c.get_label(): c.lines[0] for c in left.containers}  # errorbar: the data line of each container
    scope_line = curves["SCOPE"]
    assert list(scope_line.get_ydata()) == [10.0, 14.0]
    assert to_hex(scope_line.get_color()) == to_hex(vis.method_colors(["scope"])["scope"])
    fastv_line = curves["FastV"]
    assert fastv_line.get_xdata()[0] == pytest.approx(320.0, rel=0.05)  # at its layer average, not 64
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert "All tokens (576)" in labels and any(label.startswith("error bars") for label in labels)
    shares = sorted(round(b.get_height(), 6) for b in right.patches)
    assert shares == [20.0, 20.0]  # 2.8 / 14 and 2 / 10, in %
    plt.close(fig)


def test_family_bars_group_by_hue_in_row_order():
    df = pd.DataFrame(
        {
            "label": ["A"] * 2 + ["B"] * 2,
            "column": ["Read", "Count"] * 2,
            "value": [30.0, 40.0, 80.0, 60.0],
            "lo": [20.0, 30.0, 70.0, 50.0],
            "hi": [40.0, 50.0, 90.0, 70.0],
        }
    )
    fig, ax = plt.subplots()
    vis_results.plot_family_bars(df, ax=ax)
    bars = ax.patches
    assert [round(b.get_height()) for b in bars] == [30, 40, 80, 60]
    assert bars[0].get_x() < bars[2].get_x() < bars[1].get_x()  # A then B within each column
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Read", "Count"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B", "error bars: 95% bootstrap CI"]
    with pytest.raises(ValueError, match="label"):
        vis_results.plot_family_bars(df.drop(columns="label"))
    plt.close(fig)
    fig, ax = plt.subplots()
    vis_results.plot_family_bars(df, ax=ax, colors={"B": "#cc78bc"})  # e.g. a method's registry colour
    assert to_hex(ax.patches[2].get_facecolor()) == "#cc78bc"
    plt.close(fig)


def test_alpha_figure_draws_the_sweep_the_reference_and_the_combinations():
    alpha = pd.DataFrame(
        {"alpha": [0.0, 0.5, 1.0, 4.0], "value": [60.0, 70.0, 75.0, 65.0], "lo": [55.0, 65, 70, 60],
         "hi": [65.0, 75, 80, 70]}
    )  # fmt: skip
    combine = pd.DataFrame(
        {"label": ["gain × saliency", "gain + saliency"], "value": [75.0, 72.0], "lo": [70.0, 66.0],
         "hi": [80.0, 77.0]}
    )  # fmt: skip
    fig = vis_results.plot_alpha_and_combine(
        alpha, combine, 80.0, "scope", reference=("saliency", 58.0), budget=64
    )
    left, right = fig.axes
    sweep = left.lines[0]
    assert list(sweep.get_ydata()) == [60.0, 70.0, 75.0, 65.0]
    assert to_hex(sweep.get_color()) == to_hex(vis.method_colors(["scope"])["scope"])
    assert [t.get_text() for t in left.get_xticklabels()] == ["0", "0.5", "1", "4"]
    flat = {round(line.get_ydata()[0], 6): line for line in left.lines[1:]}
    assert set(flat) == {80.0, 58.0} and flat[58.0].get_linestyle() == ":"
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert set(labels) == {
        "SCOPE (gain × saliency^α)",
        "band: 95% bootstrap CI",
        "All tokens",
        "Saliency-only (α → ∞)",
    }
    assert right.get_xlabel() == "error bars: 95% bootstrap CI"
    assert left.get_title() == "Sensitivity to α at 64 tokens"
    assert [round(b.get_height(), 6) for b in right.patches] == [75.0, 72.0]
    assert [t.get_text() for t in right.get_xticklabels()] == ["gain × saliency", "gain + saliency"]
    assert right.get_title() == "Combining the two scores (α = 1, 64 tokens)"
    without = vis_results.plot_alpha_and_combine(
        alpha, combine, 80.0, "scope"
    )  # no reference line, no budget
    assert len(without.axes[0].lines) == 2 and without.axes[0].get_title() == "Sensitivity to α"
    with pytest.raises(ValueError, match="label"):
        vis_results.plot_alpha_and_combine(alpha, combine.drop(columns="label"), 80.0, "scope")
