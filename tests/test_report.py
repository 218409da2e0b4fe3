"""scope.report: the paper's numbers, tables from run directories, bootstrap intervals."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from scope import lock, report
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
    long = report.results_long([full.parent], ci=False)
    assert set(long["run"]) == {"none", "scope-4"} and set(long["task"]) == {"pope", "mme"}
    assert set(long["column"]) == {"POPE", "MME"} and "lo" not in long.columns
    assert long[long.run == "none"].budget.unique().tolist() == [16]  # unpruned: the tokens it fed the LLM
    wide = report.paper_layout([full, pruned], ci=True, n_boot=200, names="paper")
    assert list(wide["method"]) == [
        "Vanilla (upper bound)",
        "Vanilla (upper bound)",
        "SCOPE (Ours)",
        "SCOPE (Ours)",
    ]
    assert list(wide["budget"]) == [16, 16, 4, 4] and list(wide["kind"]) == ["raw", "rel%"] * 2
    assert "model" not in wide.columns and "options" not in wide.columns  # one model, no options
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
    assert rel["POPE lo"].isna().all()  # intervals on the raw rows only
    md = report.to_markdown(wide)
    assert md.count("\n") == len(wide) + 1 and " [" in md and "POPE lo" not in md
    both = report.compare_to_paper(wide, "table1")
    assert (
        set(both["source"]) == {"paper", "ours"}
        and "MME" in both.columns
        and "GQA" not in both.columns
        and "POPE lo" in both.columns
    )
    # our labels, and no interval columns when not wanted
    ours = report.paper_layout(report.results_long([full, pruned], ci=True, n_boot=20), intervals=False)
    assert list(ours["method"]) == ["All tokens", "All tokens", "SCOPE", "SCOPE"]
    assert list(ours.columns) == ["budget", "method", "kind", "POPE", "MME", "Avg_rel"]


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


def test_results_long_all_metrics(runs):
    full, _ = runs
    long = report.results_long([full], metrics="all", ci=True, n_boot=50)
    pope = long[long.task == "pope"].set_index("metric")
    assert {"f1", "accuracy", "adversarial/f1", "random/accuracy"} <= set(pope.index)
    assert (
        pope.loc["f1", "column"] == "POPE" and pope.loc["adversarial/f1", "column"] == "POPE adversarial/f1"
    )
    assert (long["lo"] <= long["value"] + 1e-9).all() and (long["value"] <= long["hi"] + 1e-9).all()
    mme = report.results_long([full], metrics=["perception", "cognition"])
    assert list(mme["metric"]) == ["perception", "cognition"] and list(mme["value"]) == [200.0, 0.0]
    with pytest.raises(ValueError, match="metrics"):
        report.results_long([full], metrics="everything")
    with pytest.raises(ValueError, match="no finished runs"):
        report.results_long([full / "samples"])


def _fake_run(root, name, method, budget, accuracy_by_family, options=None, tokens=576, model="toy"):
    """A scope.eval run directory (config.json, results.json, samples/synthbench.jsonl) with known scores."""
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
    cfg = {"model": model, "method": method, "budget": budget, "options": options or {}}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture
def synth(tmp_path):
    """SynthBench runs: unpruned, SCOPE at 64, SCOPE at 64 with alpha 2."""
    _fake_run(tmp_path, "none", "none", None, {"existence": 4, "counting": 2})
    _fake_run(tmp_path, "scope-64", "scope", 64, {"existence": 3, "counting": 2})
    _fake_run(
        tmp_path, "scope-64-alpha2", "scope", 64, {"existence": 2, "counting": 1}, options={"alpha": 2.0}
    )
    return tmp_path


def test_synthbench_families_become_columns_and_relative_scores(synth):
    long = report.results_long([synth], ci=True, n_boot=50)
    assert list(dict.fromkeys(long["column"])) == ["Exist. (POPE)", "Count", "Overall"]
    row = long[(long.run == "scope-64") & (long.column == "Count")].iloc[0]
    assert row.value == pytest.approx(50.0) and row.lo <= row.value <= row.hi
    assert long[long.method == "none"].budget.iloc[0] == 576  # unpruned: the tokens it fed the LLM
    assert set(long[long.run == "scope-64-alpha2"].options) == {"alpha=2.0"}

    table = report.paper_layout(long, intervals=False)
    assert list(table.columns[:4]) == ["budget", "method", "options", "kind"]
    assert table.iloc[0]["method"] == "All tokens"  # unpruned first
    rel = table[(table.kind == "rel%") & (table.options == "")].set_index("method")
    assert rel.loc["SCOPE", "Exist. (POPE)"] == pytest.approx(75.0)
    assert rel.loc["SCOPE", "Count"] == pytest.approx(100.0)
    assert rel.loc["SCOPE", "Avg_rel"] == pytest.approx(87.5)  # mean of the benchmark columns, not Overall
    assert (table.options == "alpha=2.0").sum() == 2
    with pytest.raises(ValueError, match="unpruned"):
        report.paper_layout(long[long.method != "none"], relative=True)
    raw_only = report.paper_layout(long[long.method != "none"])  # no unpruned run: raw rows only
    assert set(raw_only["kind"]) == {"raw"} and "Avg_rel" not in raw_only.columns


def test_paper_layout_keeps_models_apart_and_tabulates_runs_without_budget(tmp_path):
    _fake_run(tmp_path, "a-none", "none", None, {"counting": 4}, model="A", tokens=576)
    _fake_run(tmp_path, "a-scope", "scope", 64, {"counting": 2}, model="A")
    _fake_run(tmp_path, "b-none", "none", None, {"counting": 2}, model="B", tokens=2880)
    _fake_run(tmp_path, "b-pdrop", "pdrop", None, {"counting": 1}, model="B")  # its own ratio schedule
    table = report.paper_layout([tmp_path], ci=False)
    assert list(table.columns[:4]) == ["model", "budget", "method", "kind"]
    assert list(zip(table.model, table.budget, table.method)) == [
        ("A", 576, "All tokens"),
        ("A", 576, "All tokens"),
        ("A", 64, "SCOPE"),
        ("A", 64, "SCOPE"),
        ("B", 2880, "All tokens"),
        ("B", 2880, "All tokens"),
        ("B", "all", "PDrop"),
        ("B", "all", "PDrop"),
    ]
    rel = table[table.kind == "rel%"].set_index("method")["Count"]
    assert rel["SCOPE"] == pytest.approx(50.0) and rel["PDrop"] == pytest.approx(
        50.0
    )  # each over its own model


def test_relative_scores_and_the_side_by_side_table(synth):
    _fake_run(synth, "random-32", "random", 32, {"existence": 1, "counting": 1})
    long = report.results_long([synth], ci=True, n_boot=50)
    overall = report.relative_scores(long, column=report.OVERALL)
    assert set(overall.run) == {"scope-64", "scope-64-alpha2", "random-32"}  # pruned runs only
    s = overall.set_index("run")
    assert s.loc["scope-64", "score"] == pytest.approx(100 * 62.5 / 75.0)
    assert s.loc["random-32", "score"] == pytest.approx(100 * 25.0 / 75.0)
    assert s.loc["scope-64", "lo"] <= s.loc["scope-64", "score"] <= s.loc["scope-64", "hi"]
    mean = report.relative_scores(long[long.options == ""]).set_index("method")["score"]
    assert mean["scope"] == pytest.approx((75.0 + 100.0 + 100 * 62.5 / 75.0) / 3)  # every column, Overall too
    assert report.unpruned_scores(long).droplevel("model")["Count"] == pytest.approx(50.0)

    paper = report.paper_relative(report.paper_table("table1"))
    assert "none" not in set(paper.method) and {"scope", "pdrop", "fastv"} <= set(paper.method)
    row = paper[(paper.method == "scope") & (paper.budget == 64)].iloc[0]
    assert row.score == pytest.approx(96.0)  # Table 1's Avg_rel of SCOPE at 64 tokens
    scaled = report.paper_relative(report.paper_table("table2"), rescale=lambda b: b // 10)
    assert sorted(set(scaled.budget)) == [16, 32, 64]

    side = report.side_by_side(overall[overall.options == ""], paper)
    assert list(side.columns) == [
        "method",
        "paper @192",
        "paper @128",
        "ours @64",
        "paper @64",
        "ours @32",
    ]  # fmt: skip (budgets high to low, ours before the paper's)
    s = side.set_index("method")
    assert s.loc["SCOPE", "ours @64"] == pytest.approx(100 * 62.5 / 75.0)
    assert s.loc["SCOPE", "paper @64"] == pytest.approx(96.0)
    assert s.loc["Random", "ours @32"] == pytest.approx(100 * 25.0 / 75.0) and pd.isna(
        s.loc["Random", "ours @64"]
    )


def test_run_scores_pick_named_runs_in_the_given_order(synth):
    long = report.results_long([synth], ci=True, n_boot=20)
    overall = long[long.column == report.OVERALL]
    got = report.run_scores(overall, {2.0: "scope-64-alpha2", 1.0: "scope-64", 0.0: "coverage-64"}, "alpha")
    assert list(got.columns) == ["alpha", "value", "lo", "hi"]
    assert list(got.alpha) == [2.0, 1.0]  # coverage-64 did not run: left out
    assert list(got.value) == pytest.approx([37.5, 62.5])
    empty = report.run_scores(overall, {"x": "nothing"}, "label")
    assert empty.empty and list(empty.columns) == ["label", "value", "lo", "hi"]


def test_column_names_follow_the_tasks():
    assert report.column_name("synthbench", "counting/accuracy") == "Count"
    assert report.column_name("synthbench", "accuracy") == report.OVERALL
    assert report.column_name("synthbench", "existence/f1") == "synthbench existence/f1"
    assert report.column_name("pope", "f1") == "POPE"
    assert report.column_name("mme", "perception") == "MME perception"
    assert report.json_options({"b": 1, "alpha": 0.5}) == "alpha=0.5, b=1" and report.json_options(None) == ""
    assert report.method_label("none") == "All tokens" and report.paper_label("pdrop") == "PDrop†"


def test_markdown_folds_intervals_and_marks_missing_values():
    df = pd.DataFrame(
        {"method": ["A|B", "C"], "GQA": [50.0, float("nan")], "GQA lo": [40.0, 1.0], "GQA hi": [60.0, 2.0],
         "MME": [1.25, 2.0], "MME lo": [float("nan"), 1.0], "MME hi": [float("nan"), 3.0]}
    )  # fmt: skip
    md = report.to_markdown(df, floatfmt=".2f").splitlines()
    assert md[0] == "| method | GQA | MME |" and md[1] == "|---|---|---|"
    assert md[2] == "| A\\|B | 50.00 [40.00, 60.00] | 1.25 |"  # no interval: the value alone
    assert md[3] == "| C | – [1.00, 2.00] | 2.00 [1.00, 3.00] |"
    assert report.to_markdown(pd.DataFrame({"x": [None, True, 3]})).splitlines()[2:] == [
        "| – |",
        "| True |",
        "| 3 |",
    ]


def test_save_table_writes_csv_and_markdown_with_source(tmp_path):
    df = pd.DataFrame({"method": ["SCOPE", "Random"], "acc": [91.234, float("nan")]})
    csv, md = report.save_table(df, "demo_table", source="TinyModel", figures_dir=tmp_path, title="Demo")
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)
    text = md.read_text()
    assert text.startswith("**Demo**\n\n| method | acc |")
    assert "| SCOPE | 91.2 |" in text and "| Random | – |" in text and text.endswith(
        f"\nSource: TinyModel; environment: {lock.label()}\n"
    )
    assert lock.label().startswith("constraints.txt sha256:")
    # the CSV drops float32 noise: values equal to 6 significant digits are written identically
    noisy = pd.DataFrame({"v": [86.94842300998668, 0.87545080576092]})
    close = pd.DataFrame({"v": [86.94842300998669, 0.8754508011043072]})
    a, _ = report.save_table(noisy, "noisy", source="x", figures_dir=tmp_path / "a")
    b, _ = report.save_table(close, "noisy", source="x", figures_dir=tmp_path / "b")
    assert a.read_text() == b.read_text() == "v\n86.9484\n0.875451\n"
    with pytest.raises(ValueError, match="name"):
        report.save_table(df, "bad/name", source="x", figures_dir=tmp_path)
    with pytest.raises(ValueError, match="source"):
        report.save_table(df, "ok", source="", figures_dir=tmp_path)


def test_paper_shares_lays_table8_out_like_the_others():
    t = report.paper_shares("table8")
    raw, rel = t[t.kind == "raw"], t[t.kind == "rel%"]
    assert list(raw.budget) == [1.0, 0.25, 0.25, 0.1, 0.1]  # "100%", "25%", ..., "10%" as printed
    assert raw.method.iloc[0] == "Vanilla (upper bound)" and raw.MME.iloc[2] == 2065  # SCOPE at 25%
    scope25 = rel[(rel.method == "SCOPE (Ours)") & (rel.budget == 0.25)].iloc[0]
    assert scope25.GQA == pytest.approx(100 * 59.8 / 61.9) and scope25.Avg_rel == 94.6  # "(+0.7)" dropped
    # the printed Avg_rel is the mean of the rel% columns (checked on every pruned row, to the printed digit)
    cols = ["GQA", "MMB", "MME", "POPE"]
    assert (rel[cols].mean(axis=1) - rel.Avg_rel).abs().max() < 0.06
    side = report.paper_relative(t)
    assert sorted(set(side.method)) == ["divprune", "scope"] and len(side) == 4
