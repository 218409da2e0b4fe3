"""Plot helpers: what the pictures show, not just that they exist."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scope import vis


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_method_colours_are_distinct_and_stable_across_figures():
    everything = vis.method_colors()
    assert len(set(everything.values())) == len(everything)
    # SCOPE keeps its colour whichever methods it shares a plot with, and in whatever order.
    assert vis.method_colors(["random", "scope"])["scope"] == everything["scope"]
    assert vis.method_colors(["scope", "mystery"])["mystery"] not in {everything[m] for m in ["scope"]}
    assert len(set(vis.method_markers(["scope", "saliency", "a", "b"]).values())) == 4


def test_dim_dropped_keeps_kept_cells_and_darkens_the_rest():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 1.0, size=(48, 48, 3))
    kept = [0, 5, 15]  # 4x4 grid of 12x12-pixel cells
    out = vis.dim_dropped(image, kept, grid=16, dim=0.5)
    mask = vis.kept_mask(kept, 16)
    assert mask.sum() == 3 and mask[0, 0] and mask[1, 1] and mask[3, 3]
    for r in range(4):
        for c in range(4):
            cell = (slice(12 * r, 12 * r + 12), slice(12 * c, 12 * c + 12))
            expected = image[cell] if mask[r, c] else 0.5 * image[cell]
            np.testing.assert_allclose(out[cell], expected)


def test_images_in_any_layout_become_rgb_in_unit_range():
    pil = Image.new("RGB", (20, 10), (255, 0, 0))
    assert vis.dim_dropped(pil, [0], grid=(1, 2)).shape == (10, 20, 3)
    chw = np.full((3, 8, 8), 255.0)
    out = vis.dim_dropped(chw, [0], grid=4, dim=0.0)
    assert out.shape == (8, 8, 3) and out[:4, :4].max() == 1.0 and out[4:, 4:].max() == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kept": [16], "grid": 16}, "kept indices"),
        ({"kept": [0], "grid": 15}, "not a square"),
        ({"kept": [0], "grid": 16, "dim": 2.0}, "dim"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vis.dim_dropped(np.zeros((8, 8, 3)), **kwargs)


def test_kept_token_panels_outline_every_kept_token():
    image = np.zeros((24, 24, 3))
    fig = vis.plot_kept_tokens(image, {"scope": [0, 1, 2], "saliency": [3]}, grid=36)
    axes = fig.axes
    assert axes[0].get_title() == "Input image"
    assert [len(ax.patches) for ax in axes[1:3]] == [3, 1]
    assert axes[1].get_title().startswith("SCOPE (3 tokens)")


def test_theta_coverage_plot_has_one_curve_per_method_in_percent():
    thetas = np.linspace(0, 1, 5)
    rows = [
        {"method": m, "theta": t, "coverage": max(0.0, 1 - t * s), "image": i}
        for m, s in [("scope", 0.5), ("saliency", 1.5), ("random", 1.0)]
        for t in thetas
        for i in range(3)
    ]
    ax = vis.plot_theta_coverage(pd.DataFrame(rows))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["SCOPE", "Saliency-only", "Random", "band: 95% bootstrap CI over images"]
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0  # beside the axes, not on the curves
    ys = np.concatenate([line.get_ydata() for line in ax.lines])
    assert ys.max() == pytest.approx(100.0) and ys.min() >= 0.0
    assert "%" in ax.get_ylabel()
    # the three curves are shifted apart in theta by 0.003 each (all start at coverage 100%)
    firsts = sorted(line.get_xdata()[0] for line in ax.lines if len(line.get_xdata()) == len(thetas))
    np.testing.assert_allclose(firsts, [-0.003, 0.0, 0.003], atol=1e-12)
    with pytest.raises(ValueError, match="coverage"):
        vis.plot_theta_coverage(pd.DataFrame({"method": ["scope"], "theta": [0.1]}))


def test_attention_skew_is_a_share_of_the_total_and_needs_sorted_rows():
    att = np.sort(np.random.default_rng(0).dirichlet(np.full(64, 0.2), size=4), axis=1)[:, ::-1]
    ax = vis.plot_attention_skew(att, top=16)
    mean_line = ax.lines[0]
    assert len(mean_line.get_xdata()) == 16
    np.testing.assert_allclose(mean_line.get_ydata(), 100 * att[:, :16].mean(0) / 1.0, rtol=1e-6)
    assert np.all(np.diff(mean_line.get_ydata()) <= 0)
    with pytest.raises(ValueError, match="sorted"):
        vis.plot_attention_skew(att[:, ::-1])


def test_budget_curves_draw_reference_and_log_ticks():
    df = pd.DataFrame(
        {
            "method": ["scope"] * 3 + ["random"] * 3,
            "budget": [8, 64, 192] * 2,
            "score": [50, 80, 90, 30, 60, 85],
        }
    )
    ax = vis.plot_budget_curves(df, reference=92.0)
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "64", "192"]
    assert any(np.allclose(line.get_ydata(), 92.0) for line in ax.lines)


def test_in_llm_methods_are_placed_at_their_layer_average():
    df = pd.DataFrame(
        {
            "method": ["scope", "fastv", "pdrop", "pdrop"],
            "budget": [64, 64, 64, 128],
            "equivalent_tokens": [64.0, 320.0, None, 200.0],  # PDrop at 64: not recorded -> its budget
        }
    )
    assert vis.plotted_tokens(df).tolist() == [64.0, 320.0, 64.0, 200.0]
    assert vis.plotted_tokens(df.drop(columns="equivalent_tokens")).tolist() == [64.0, 64.0, 64.0, 128.0]


def test_budget_curves_jitter_equal_curves_label_the_band_and_keep_the_legend_off_the_data():
    df = pd.DataFrame(
        {
            "method": ["scope"] * 2 + ["divprune"] * 2 + ["fastv"] * 2,
            "budget": [64, 192] * 3,
            "equivalent_tokens": [64, 192, 64, 192, 320, 384],
            "score": [80.0, 90.0] * 3,  # three identical curves
            "lo": [75.0, 85.0] * 3,
            "hi": [85.0, 95.0] * 3,
        }
    )
    fig, ax = plt.subplots()
    vis.plot_budget_curves(df, ax=ax, band_label="95% bootstrap CI (questions)")
    curves = {line.get_label(): line for line in ax.lines}
    scope_x, div_x = curves["SCOPE"].get_xdata(), curves["DivPrune"].get_xdata()
    assert not np.allclose(scope_x, div_x)  # shifted apart ...
    np.testing.assert_allclose(np.log2(div_x) - np.log2(scope_x), 0.04)  # ... by a fixed small step (octaves)
    np.testing.assert_allclose(curves["FastV"].get_xdata(), np.array([320, 384]) * 2**0.04)  # layer average
    assert ax.get_xlabel().startswith("Visual tokens per LLM layer")
    # ticked at the budgets, and on to the in-LLM layer averages (2^k and 1.5 x 2^k beyond the last budget)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "192", "256", "384"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "band: 95% bootstrap CI (questions)" in labels
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0
    with pytest.raises(ValueError, match="legend"):
        vis.plot_budget_curves(df, legend="inside")
    plt.close(fig)


def test_figure_legend_collects_each_label_once():
    fig, axes = plt.subplots(1, 2)
    for ax in axes:
        ax.plot([0, 1], [0, 1], label="SCOPE")
        ax.plot([0, 1], [1, 0], label="Random")
    axes[1].plot([0, 1], [0.5, 0.5], label="All tokens")
    vis.figure_legend(fig, axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["SCOPE", "Random", "All tokens"]
    plt.close(fig)


def test_save_figure_writes_png_and_pdf_with_source(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = vis.save_figure(fig, "demo", source="TinyModel on toy data", figures_dir=tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert Image.open(paths[0]).size[0] > 100 and paths[1].read_bytes().startswith(b"%PDF")
    assert any("TinyModel on toy data" in t.get_text() for t in fig.texts)
    with pytest.raises(ValueError, match="name"):
        vis.save_figure(fig, "bad/name", source="x", figures_dir=tmp_path)
    with pytest.raises(ValueError, match="source"):
        vis.save_figure(fig, "demo", source="", figures_dir=tmp_path)


def test_token_map_checks_size_and_can_stretch_small_values():
    from matplotlib.colors import PowerNorm

    image = np.zeros((16, 16, 3))
    ax = vis.draw_token_map(image, np.arange(16.0), grid=16, gamma=0.5, label="attention (%)")
    overlay = ax.images[-1]
    assert isinstance(overlay.norm, PowerNorm) and overlay.get_array().shape == (4, 4)
    assert overlay.get_array()[3, 3] == 15.0  # raster order: last token bottom-right
    with pytest.raises(ValueError, match="values has 15"):
        vis.draw_token_map(image, np.arange(15.0), grid=16)
