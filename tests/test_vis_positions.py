"""scope.vis_positions: the M-RoPE positions of kept tokens, checked against positions written by hand."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import scope
from scope.testing import tiny_images, tiny_qwen2_vl
from scope.vis_positions import kept_positions, plot_kept_positions


@pytest.fixture(scope="module", params=["2", "2.5"])
def table(request):
    model, processor = tiny_qwen2_vl(seed=0, version=request.param)
    with scope.patch(model, "scope", budget=0.25):
        return kept_positions(model, processor, tiny_images(1, size=(48, 32))[0])


def test_positions_by_hand(table):
    vis, text = table[table.kind == "visual"], table[table.kind == "text"]
    # 48x32 px, 4-px patches: 8 x 12 patches, merged 2x2 -> 4 rows x 6 columns = 24 tokens, a quarter kept
    assert len(vis) == 24 and int(vis.kept.sum()) == 6 and text.kept.all()
    s = int(vis["index"].min())  # the image starts at place s; before it t = h = w = place
    before = text[text["index"] < s]
    assert (before.t == before["index"]).all() and (before.h == before["index"]).all()
    assert (vis.t == s).all() and (vis.h == s + vis.row).all() and (vis.w == s + vis.col).all()
    after = text[text["index"] > s]
    first = after["index"].min()
    assert (after.w == s + 6 + (after["index"] - first)).all()  # continues from s + max(4, 6)


def test_the_language_model_receives_the_unpruned_positions(table):
    kept, pruned = table[table.kept], table[~table.kept]
    for a in "thw":
        assert (kept[f"llm_{a}"] == kept[a]).all()
        assert pruned[f"llm_{a}"].isna().all()


def test_plot_fills_the_kept_cells(table):
    left, right = plot_kept_positions(table)
    grid = left.images[0].get_array()
    assert grid.shape == (4, 6) and int(np.asarray(grid).sum()) == 6
    assert len(right.lines) == 6  # t, h, w: unpruned line and kept markers


def test_unpatched_model_is_refused():
    model, processor = tiny_qwen2_vl(seed=0)
    with pytest.raises(ValueError, match="not patched"):
        kept_positions(model, processor, tiny_images(1)[0])
