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
    assert labels == ["SCOPE", "Saliency-only", "Random"]
    ys = np.concatenate([line.get_ydata() for line in ax.lines])
    assert ys.max() == pytest.approx(100.0) and ys.min() >= 0.0
    assert "%" in ax.get_ylabel()
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
    vis.plot_family_bars(df, ax=ax)
    bars = ax.patches
    assert [round(b.get_height()) for b in bars] == [30, 40, 80, 60]
    assert bars[0].get_x() < bars[2].get_x() < bars[1].get_x()  # A then B within each column
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Read", "Count"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"]
    with pytest.raises(ValueError, match="label"):
        vis.plot_family_bars(df.drop(columns="label"))
    plt.close(fig)


def test_save_figure_and_table_write_all_formats_with_source(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = vis.save_figure(fig, "demo", source="TinyModel on toy data", figures_dir=tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert Image.open(paths[0]).size[0] > 100 and paths[1].read_bytes().startswith(b"%PDF")
    assert any("TinyModel on toy data" in t.get_text() for t in fig.texts)

    df = pd.DataFrame({"method": ["SCOPE", "Random"], "acc": [91.234, float("nan")]})
    csv, md = vis.save_table(df, "demo_table", source="TinyModel", figures_dir=tmp_path, title="Demo")
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)
    text = md.read_text()
    # the CSV drops float32 noise: values equal to 6 significant digits are written identically
    noisy = pd.DataFrame({"v": [86.94842300998668, 0.87545080576092]})
    close = pd.DataFrame({"v": [86.94842300998669, 0.8754508011043072]})
    a, _ = vis.save_table(noisy, "noisy", source="x", figures_dir=tmp_path / "a")
    b, _ = vis.save_table(close, "noisy", source="x", figures_dir=tmp_path / "b")
    assert a.read_text() == b.read_text() == "v\n86.9484\n0.875451\n"
    assert "| SCOPE | 91.2 |" in text and "| Random | – |" in text and "Source: TinyModel" in text
    with pytest.raises(ValueError, match="name"):
        vis.save_table(df, "bad/name", source="x", figures_dir=tmp_path)
    with pytest.raises(ValueError, match="source"):
        vis.save_figure(fig, "demo", source="", figures_dir=tmp_path)


def _fake_run(root, name, method, budget, accuracy_by_family, options=None, tokens=576):
    """A scope.eval run directory (config.json, results.json, samples/synthbench.jsonl) with known scores."""
    import json

    from scope.eval import get_task

    d = root / name
    (d / "samples").mkdir(parents=True)
    task = get_task("synthbench")
    records, idx = [], 0
    for fam, correct in accuracy_by_family.items():
        for k in range(4):  # 4 questions per family, `correct` of them right
            ok = k < correct
            rec = {"idx": idx, "family": fam, "subset": "random", "score": float(ok), "answer": "yes"}
            if fam == "existence":
                rec["label"] = "yes" if ok else "no"
            records.append(rec)
            idx += 1
    (d / "samples" / "synthbench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = task.aggregate(records)
    results = {
        "tasks": {
            "synthbench": {
                "main": "accuracy",
                "value": metrics["accuracy"],
                "metrics": metrics,
                "n": len(records),
                "mean_kept_tokens": tokens if method == "none" else budget,
            }
        }
    }
    cfg = {"model": "toy", "method": method, "budget": budget, "options": options or {}}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_results_long_and_paper_style_compute_relative_scores(tmp_path):
    _fake_run(tmp_path, "none", "none", None, {"existence": 4, "counting": 2})
    _fake_run(tmp_path, "scope-64", "scope", 64, {"existence": 3, "counting": 2})
    _fake_run(
        tmp_path, "scope-64-alpha2", "scope", 64, {"existence": 2, "counting": 1}, options={"alpha": 2.0}
    )
    long = vis.results_long([tmp_path], ci=True, n_boot=50)
    assert set(long["column"]) == {"Exist. (POPE)", "Count", "Overall"}
    row = long[(long.run == "scope-64") & (long.column == "Count")].iloc[0]
    assert row.value == pytest.approx(50.0) and row.lo <= row.value <= row.hi
    assert long[long.method == "none"].budget.iloc[0] == 576  # unpruned: the tokens it fed the LLM

    table = vis.paper_style(long)
    assert list(table.columns[:4]) == ["budget", "method", "options", "kind"]
    assert table.iloc[0]["method"] == "All tokens"  # unpruned first
    rel = table[(table.kind == "rel%") & (table.options == "")].set_index("method")
    assert rel.loc["SCOPE", "Exist. (POPE)"] == pytest.approx(75.0)
    assert rel.loc["SCOPE", "Count"] == pytest.approx(100.0)
    assert rel.loc["SCOPE", "Avg_rel"] == pytest.approx(87.5)  # mean of the benchmark columns, not Overall
    assert (table.options == "alpha=2.0").sum() == 2
    with pytest.raises(ValueError, match="unpruned"):
        vis.paper_style(long[long.method != "none"])


def test_paper_method_names_map_to_our_keys_and_run_groups_are_stable():
    assert vis.paper_method("SCOPE (Ours)") == "scope"
    assert vis.paper_method("PDrop†") == "pdrop"
    assert vis.paper_method("Vanilla (upper bound)") == "none"
    assert vis.paper_method("Coverage-only") == "coverage"
    from scope.eval.rundir import checkpoint_fingerprint
    from scope.paths import MINILLAVA_DIR

    fp = checkpoint_fingerprint(MINILLAVA_DIR)
    assert fp is not None and fp.startswith("sha256:") and len(fp) == 19
    assert vis.run_group(None, "synthbench", 96, 0) == f"minillava_synthbench_limit96_seed0_{fp[7:]}"
    assert (  # a hub id is not a local folder: no fingerprint, the revision goes to config.json instead
        vis.run_group("llava-hf/llava-1.5-7b-hf", "gqa,pope", None, 1)
        == "llava-1.5-7b-hf_gqa+pope_limitall_seed1"
    )


def test_a_retrained_local_checkpoint_gets_a_new_fingerprint(tmp_path):
    from scope.eval.rundir import checkpoint_fingerprint

    assert checkpoint_fingerprint(tmp_path) is None  # no weights
    assert checkpoint_fingerprint("") is None  # an in-memory model's empty name_or_path
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    first = checkpoint_fingerprint(tmp_path)
    assert first == checkpoint_fingerprint(tmp_path)  # stable
    (tmp_path / "model.safetensors").write_bytes(b"weights v2")
    assert checkpoint_fingerprint(tmp_path) != first
    assert vis.run_group(str(tmp_path), "synthbench", None, 0).endswith(checkpoint_fingerprint(tmp_path)[7:])


def test_token_map_checks_size_and_can_stretch_small_values():
    from matplotlib.colors import PowerNorm

    image = np.zeros((16, 16, 3))
    ax = vis.draw_token_map(image, np.arange(16.0), grid=16, gamma=0.5, label="attention (%)")
    overlay = ax.images[-1]
    assert isinstance(overlay.norm, PowerNorm) and overlay.get_array().shape == (4, 4)
    assert overlay.get_array()[3, 3] == 15.0  # raster order: last token bottom-right
    with pytest.raises(ValueError, match="values has 15"):
        vis.draw_token_map(image, np.arange(15.0), grid=16)
