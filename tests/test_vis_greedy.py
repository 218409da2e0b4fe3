"""The pictures of notebook 00b (how a greedy picks tokens) and notebook 01's per-image coverage: what they
show, checked on tiny hand-made inputs."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from scope import vis


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _offsets(ax):
    return [np.asarray(c.get_offsets()) for c in ax.collections]


def test_mark_tokens_puts_a_marker_at_each_token_centre():
    fig, ax = plt.subplots()
    vis.mark_tokens(ax, [0, 5, 15], grid=16, shape=(40, 80))  # 4x4 cells of 10 x 20 pixels
    np.testing.assert_allclose(_offsets(ax)[0], [[10, 5], [30, 15], [70, 35]])
    with pytest.raises(ValueError, match="kept indices"):
        vis.mark_tokens(ax, [16], grid=16, shape=(40, 80))


def test_value_overlay_shows_the_values_on_a_fixed_scale():
    fig, ax = plt.subplots()
    values = np.arange(16) / 30.0
    layer, shape = vis.draw_value_overlay(ax, np.zeros((8, 8, 3)), values, grid=16)
    assert shape == (8, 8)
    np.testing.assert_allclose(layer.get_array(), values.reshape(4, 4))
    assert layer.get_clim() == (0.0, 1.0)  # not stretched to the values' own range
    with pytest.raises(ValueError, match="15 entries"):
        vis.draw_value_overlay(ax, np.zeros((8, 8, 3)), values[:15], grid=16)


def _steps(n_steps=3, n=16):
    rng = np.random.default_rng(0)
    return {
        "scope": {
            "picks": [5, 0, 10][:n_steps],
            "score": rng.uniform(0, 4, size=(n_steps, n)),
            "cover": rng.uniform(0, 1, size=(n_steps, n)),
        },
        "saliency": {"picks": [1, 2, 3, 4], "cover": rng.uniform(0, 1, size=(n_steps, n))},
    }


def test_greedy_steps_one_column_per_step_three_panels_each_and_the_pick_marked():
    steps = _steps()
    fig = vis.plot_greedy_steps(np.zeros((40, 40, 3)), 16, steps, ncols=2, title="demo")
    grid_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(grid_axes) == 2 * 3 * 2  # 3 steps wrap after 2 columns: 2 bands of (score, cover, cover)
    rows = np.array(grid_axes).reshape(6, 2)
    assert [ax.get_title() for ax in rows[[0, 0, 3], [0, 1, 0]]] == ["pick 1", "pick 2", "pick 3"]
    assert not rows[3, 1].axison and not rows[5, 1].axison  # no 4th step
    assert rows[0, 0].get_ylabel() == "SCOPE\nscore / best" and "Saliency-only" in rows[2, 0].get_ylabel()
    # step 2 (column 1 of band 0): the score divided by its best, the new pick marked at token 0's centre
    score_layer = rows[0, 1].images[1]
    np.testing.assert_allclose(
        score_layer.get_array(), (steps["scope"]["score"][1] / steps["scope"]["score"][1].max()).reshape(4, 4)
    )
    earlier, pick = _offsets(rows[0, 1])
    np.testing.assert_allclose(earlier, [[15, 15]])
    np.testing.assert_allclose(pick, [[5, 5]])
    assert len(_offsets(rows[2, 1])[0]) == 2  # saliency's first 2 tokens after step 2
    assert fig.get_suptitle() == "demo"
    # laid out once: saving (as save_figure does, after placing its source line) moves no panel
    before = [ax.get_position().bounds for ax in fig.axes]
    fig.savefig(io.BytesIO(), format="png")
    assert [ax.get_position().bounds for ax in fig.axes] == before
    with pytest.raises(ValueError, match="scope"):
        vis.plot_greedy_steps(np.zeros((40, 40, 3)), 16, {**steps, "scope": {**steps["scope"], "picks": [5]}})


def test_selection_contrast_outlines_kept_tokens_and_tints_merged_groups():
    kept = {"saliency": [0, 1], "visionzip": [0, 15]}
    covers = {m: np.linspace(0, 1, 16) for m in kept}
    groups = np.full(16, np.nan)
    groups[[2, 3, 15]] = 1.0
    fig = vis.plot_selection_contrast(
        np.zeros((40, 40, 3)),
        16,
        kept,
        covers,
        notes={"saliency": "θ=0.9: 12%"},
        groups={"visionzip": groups},
    )
    (sal_top, vz_top), (sal_bottom, vz_bottom) = np.array(fig.axes[:4]).reshape(2, 2, order="F").T
    assert len(sal_top.patches) == 2 and len(vz_top.patches) == 2
    tint = vz_top.images[-1].get_array()
    assert tint.mask.sum() == 13 and tint[0, 2] == 1 and tint[3, 3] == 1
    assert sal_bottom.get_title() == "coverage\nθ=0.9: 12%" and vz_bottom.get_title() == "coverage"
    assert "merged" in vz_top.get_title() and "merged" not in sal_top.get_title()
    with pytest.raises(ValueError, match="same methods"):
        vis.plot_selection_contrast(np.zeros((40, 40, 3)), 16, kept, {"saliency": covers["saliency"]})


def test_coverage_per_image_has_a_dot_per_image_and_the_mean_as_a_bar():
    data = pd.DataFrame(
        {"method": ["scope"] * 3 + ["saliency"] * 3, "coverage": [1.0, 1.0, 0.7, 1.0, 0.3, 0.2]}
    )
    ax = vis.plot_coverage_per_image(data, title="θ = 0.9")
    *dots, means = _offsets(ax)
    assert [len(d) for d in dots] == [3, 3]  # the registry's order: SCOPE, then saliency-only
    np.testing.assert_allclose(sorted(dots[1][:, 1]), [20, 30, 100])
    np.testing.assert_allclose(means, [[0, 90.0], [1, 50.0]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["SCOPE", "Saliency-only"]
    with pytest.raises(ValueError, match="coverage"):
        vis.plot_coverage_per_image(data.drop(columns="coverage"))


def test_coverage_per_image_jitter_is_seeded_and_leaves_numpys_generator_alone():
    data = pd.DataFrame({"method": ["scope"] * 5 + ["random"] * 5, "coverage": np.linspace(0, 1, 10)})
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    first = _offsets(vis.plot_coverage_per_image(data, ax=plt.figure().gca()))
    assert np.random.random() == expected_next  # the caller's global stream is untouched
    again = _offsets(vis.plot_coverage_per_image(data, ax=plt.figure().gca()))
    other = _offsets(vis.plot_coverage_per_image(data, ax=plt.figure().gca(), seed=1))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][:, 0], other[0][:, 0])
    plt.close("all")
