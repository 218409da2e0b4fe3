"""scope.report: the paper's numbers, tables from run directories, bootstrap intervals."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from scope import report
from scope.eval import rescore
from scope.paths import PAPER_DIR


def _write_run(path, method, budget, pope_correct, mme_correct, kept):
    """A run directory written the way the runner writes one, with chosen per-sample correctness."""
    (path / "samples").mkdir(parents=True)
    cfg = {
        "model": "m",
        "method": method,
        "budget": budget,
        "options": {},
        "limit": None,
        "seed": 0,
        "tasks": ["pope", "mme"],
    }
    (path / "config.json").write_text(json.dumps(cfg))
    cats = ["adversarial", "popular", "random"]
    with (path / "samples" / "pope.jsonl").open("w") as f:
        for i, ok in enumerate(pope_correct):
            gold = "yes" if i % 2 == 0 else "no"
            label = gold if ok else ("no" if gold == "yes" else "yes")
            f.write(
                json.dumps(
                    {
                        "idx": i,
                        "answer": gold,
                        "label": label,
                        "score": float(ok),
                        "category": cats[i % 3],
                        "kept_tokens": kept,
                    }
                )
                + "\n"
            )
    with (path / "samples" / "mme.jsonl").open("w") as f:
        for i, ok in enumerate(mme_correct):
            f.write(
                json.dumps(
                    {
                        "idx": i,
                        "score": float(ok),
                        "category": "existence",
                        "pair": f"p{i // 2}",
                        "kept_tokens": kept,
                    }
                )
                + "\n"
            )
    rescore(path)
    return path


@pytest.fixture
def runs(tmp_path):
    rng = random.Random(0)
    full = _write_run(
        tmp_path / "none", "none", None, [rng.random() < 0.9 for _ in range(60)], [1, 1] * 10, 16
    )
    pruned = _write_run(
        tmp_path / "scope-4", "scope", 4, [rng.random() < 0.7 for _ in range(60)], [1, 0] * 5 + [1, 1] * 5, 4
    )
    return full, pruned


def test_paper_tables_are_the_shared_csvs():
    t1 = report.paper_table("table1")
    assert list(t1.columns[:4]) == ["budget", "method", "venue", "kind"]
    row = t1[(t1.budget == 64) & (t1.method == "SCOPE (Ours)") & (t1.kind == "raw")].iloc[0]
    assert (row.GQA, row.MME, row.POPE) == (58.3, 1698, 83.9)
    assert report.paper_table("table4_ablation_llava15_7b_64").shape == (4, 6)
    assert len(list(PAPER_DIR.glob("*.csv"))) == 10 and "2510.24214" in (PAPER_DIR / "README.md").read_text()
    with pytest.raises(ValueError, match="table99"):
        report.paper_table("table99")


def test_results_and_paper_layout(runs):
    full, pruned = runs
    long = report.results_table([full.parent], ci=False)
    assert set(long["run"]) == {"none", "scope-4"} and set(long["task"]) == {"pope", "mme"}
    wide = report.paper_layout([full, pruned], ci=True, n_boot=200)
    assert list(wide["method"]) == [
        "Vanilla (upper bound)",
        "Vanilla (upper bound)",
        "SCOPE (Ours)",
        "SCOPE (Ours)",
    ]
    assert list(wide["budget"]) == [16, 16, 4, 4] and list(wide["kind"]) == ["raw", "rel%"] * 2
    raw = wide[wide.kind == "raw"].set_index("method")
    rel = wide[wide.kind == "rel%"].set_index("method")
    for col in ("POPE", "MME"):
        assert rel.loc["SCOPE (Ours)", col] == pytest.approx(
            100 * raw.loc["SCOPE (Ours)", col] / raw.loc["Vanilla (upper bound)", col]
        )
    assert rel.loc["Vanilla (upper bound)", "Avg_rel"] == pytest.approx(100.0)
    assert rel.loc["SCOPE (Ours)", "Avg_rel"] == pytest.approx(
        rel.loc["SCOPE (Ours)", ["POPE", "MME"]].mean()
    )
    # MME by hand: full run has every pair right -> 200; pruned: 5 half pairs + 5 full pairs -> 75 + 50
    assert raw.loc["Vanilla (upper bound)", "MME"] == 200 and raw.loc["SCOPE (Ours)", "MME"] == pytest.approx(
        125.0
    )
    lo, hi = raw.loc["SCOPE (Ours)", "POPE lo"], raw.loc["SCOPE (Ours)", "POPE hi"]
    assert lo < raw.loc["SCOPE (Ours)", "POPE"] < hi
    md = report.to_markdown(wide)
    assert md.count("\n") == len(wide) + 1 and " [" in md and "POPE lo" not in md
    both = report.compare_to_paper(wide, "table1")
    assert (
        set(both["source"]) == {"paper", "ours"}
        and "MME" in both.columns
        and "GQA" not in both.columns
        and "POPE lo" in both.columns
    )


def test_bootstrap_is_seeded_and_shrinks_with_more_data():
    def recs(n):
        return [
            {
                "idx": i,
                "answer": "yes" if i % 2 else "no",
                "label": "yes",
                "score": float(i % 2),
                "category": "",
            }
            for i in range(n)
        ]

    a = report.bootstrap_ci(recs(40), "pope", n_boot=300, seed=1)
    assert a == report.bootstrap_ci(recs(40), "pope", n_boot=300, seed=1)
    b = report.bootstrap_ci(recs(400), "pope", n_boot=300, seed=1)
    assert b[1] - b[0] < a[1] - a[0]
    point = 100 * 2 * 0.5 / 1.5  # precision 1/2, recall 1 -> F1 2/3
    assert a[0] <= point <= a[1]
    with pytest.raises(ValueError, match="level"):
        report.bootstrap_ci(recs(4), "pope", level=1.5)


def test_bootstrap_resamples_mme_pairs_whole():
    # every pair is (right, wrong): any resample of whole pairs scores exactly acc 50 + acc+ 0
    recs = [
        {"idx": i, "score": float(i % 2 == 0), "category": "existence", "pair": f"p{i // 2}"}
        for i in range(40)
    ]
    assert report.bootstrap_ci(recs, "mme", n_boot=100) == (50.0, 50.0)


def test_report_cli_writes_markdown_and_csv(runs, tmp_path, capsys):
    full, _ = runs
    out = tmp_path / "tables" / "mine"
    assert report.main([str(full.parent), "--paper", "table1", "--out", str(out), "--n-boot", "50"]) == 0
    assert out.with_suffix(".md").read_text().startswith("| source |")
    assert "SCOPE (Ours)" in set(pd.read_csv(out.with_suffix(".csv"))["method"])
    assert "Vanilla" in capsys.readouterr().out


def test_results_table_all_metrics(runs):
    full, _ = runs
    long = report.results_table([full], metrics="all", ci=True, n_boot=50)
    pope = long[long.task == "pope"].set_index("metric")
    assert {"f1", "accuracy", "adversarial/f1", "random/accuracy"} <= set(pope.index)
    assert (long["ci_low"] <= long["value"] + 1e-9).all() and (long["value"] <= long["ci_high"] + 1e-9).all()
    mme = report.results_table([full], metrics=["perception", "cognition"])
    assert list(mme["metric"]) == ["perception", "cognition"] and list(mme["value"]) == [200.0, 0.0]
