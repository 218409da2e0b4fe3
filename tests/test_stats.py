"""scope.stats: McNemar's exact test, paired bootstrap intervals, tests between run directories, markers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scope import report, stats
from scope.eval.tasks import get_task


def _scores(only_a: int, only_b: int, both: int = 5, neither: int = 3):
    """Per-question 0/1 scores of two runs with the given numbers of each kind of question."""
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    return a, b


@pytest.mark.parametrize(
    "only_a, only_b, p",
    [
        (3, 0, 2 * 1 / 8),  # n = 3: P(X <= 0) = 1/8, two-sided 1/4
        (8, 1, 2 * (1 + 9) / 512),  # n = 9: P(X <= 1) = (C(9,0) + C(9,1)) / 2^9
        (1, 8, 2 * (1 + 9) / 512),  # symmetric
        (0, 6, 2 / 64),  # n = 6: 2 * 1/64 = 0.03125 < 0.05
        (5, 5, 1.0),  # 2 * P(X <= 5 | n = 10) = 2 * 638/1024 > 1 -> 1
        (0, 0, 1.0),  # the runs never disagree
    ],
)
def test_mcnemar_exact_p_values_by_hand(only_a, only_b, p):
    a, b = _scores(only_a, only_b)
    out = stats.mcnemar(a, b)
    assert (out["only_a"], out["only_b"]) == (only_a, only_b)
    assert out["p"] == pytest.approx(p, rel=1e-12)


def test_mcnemar_refuses_soft_scores_and_unequal_lengths():
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar([1, 0.5], [1, 0])
    with pytest.raises(ValueError, match="same questions"):
        stats.mcnemar([1, 0, 1], [1, 0])


def test_bootstrap_mean_interval_is_seeded_degenerate_when_constant_and_near_normal_when_large():
    assert stats.bootstrap_mean_ci([2.0] * 30) == (2.0, 2.0)
    assert stats.bootstrap_mean_ci([0.0] * 30) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    diff = rng.choice([-100.0, 0.0, 100.0], p=[0.1, 0.7, 0.2], size=2000)
    lo, hi = stats.bootstrap_mean_ci(diff, n_boot=2000, seed=3)
    assert (lo, hi) == stats.bootstrap_mean_ci(diff, n_boot=2000, seed=3)  # seeded
    # independent check: the normal approximation mean +- 1.96 sd / sqrt(n)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    assert lo == pytest.approx(diff.mean() - half, abs=0.25 * half)
    assert hi == pytest.approx(diff.mean() + half, abs=0.25 * half)
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_mean_ci(diff, level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap_mean_ci(diff, n_boot=0)


def _synth_records(correct_by_family):
    """SynthBench-like records: family -> list of 0/1 correctness, question ids shared across runs."""
    records = []
    for fam, correct in correct_by_family.items():
        for k, ok in enumerate(correct):
            rec = {"idx": len(records), "qid": f"{fam}-{k}", "family": fam, "subset": "s", "score": float(ok)}
            rec["answer"] = "yes"
            if fam == "existence":
                rec["label"] = "yes" if ok else "no"
            records.append(rec)
    return records


def test_per_question_finds_the_questions_a_percentage_is_taken_over():
    recs = _synth_records({"existence": [1, 0, 1, 1], "counting": [0, 0, 1, 0]})
    ids, scores = stats.per_question(recs, "synthbench", "counting/accuracy")
    assert ids == ["counting-0", "counting-1", "counting-2", "counting-3"]
    assert scores.tolist() == [0, 0, 1, 0]
    ids, scores = stats.per_question(recs, "synthbench", "accuracy")
    assert len(ids) == 8 and scores.sum() == 4
    assert stats.per_question(recs, "synthbench", "existence/f1") is None  # F1 is not a percentage correct
    soft = [{**r, "score": 0.3} for r in recs]  # VQA-style soft scores: no McNemar
    assert stats.per_question(soft, "textvqa_val", "accuracy") is None
    mme = [{"idx": i, "score": 1.0, "category": "existence", "pair": f"p{i // 2}"} for i in range(4)]
    assert stats.per_question(mme, "mme", "total") is None  # resampled by pairs


def _write_run(root, name, method, budget, correct_by_family, options=None):
    d = root / name
    (d / "samples").mkdir(parents=True)
    records = _synth_records(correct_by_family)
    (d / "samples" / "synthbench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = get_task("synthbench").aggregate(records)
    tokens = 576 if method == "none" else budget
    res = {"main": "accuracy", "value": metrics["accuracy"], "metrics": metrics, "n": len(records)}
    (d / "results.json").write_text(
        json.dumps({"tasks": {"synthbench": {**res, "mean_kept_tokens": tokens}}})
    )
    cfg = {"model": "m", "method": method, "budget": budget, "options": options or {}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture
def runs(tmp_path):
    ones, n = [1] * 20, 20
    _write_run(tmp_path, "none", "none", None, {"existence": ones, "counting": ones})
    # SCOPE at 64: existence untouched, counting loses 8 questions (McNemar p = 2/256)
    _write_run(tmp_path, "scope-64", "scope", 64, {"existence": ones, "counting": [0] * 8 + [1] * 12})
    # random at 64: loses 2 existence questions (p = 0.5) and 12 counting ones, 4 of them also lost by SCOPE
    _write_run(
        tmp_path,
        "random-64",
        "random",
        64,
        {"existence": [0, 0] + [1] * 18, "counting": [1] * 4 + [0] * 12 + [1] * 4},
    )
    _write_run(
        tmp_path, "scope-64-alpha2", "scope", 64, {"existence": ones, "counting": [1] * n}, {"alpha": 2.0}
    )
    _write_run(tmp_path, "random-32", "random", 32, {"existence": ones, "counting": ones})
    return tmp_path


def test_paired_tests_against_the_unpruned_run(runs):
    t = stats.paired_tests([runs], n_boot=400).set_index(["run", "column"])
    assert set(t.index.get_level_values("run")) == {"scope-64", "random-64", "scope-64-alpha2", "random-32"}
    row = t.loc[("scope-64", "Count")]
    assert (row.only_run, row.only_reference) == (0, 8)
    assert row.p == pytest.approx(2 / 2**8) and row.differs and row.test == stats.MCNEMAR
    assert row["diff"] == pytest.approx(-40.0) and row["diff lo"] <= -40.0 <= row["diff hi"] < 0
    row = t.loc[("random-64", "Exist. (POPE)")]
    assert (row.only_run, row.only_reference, row.p) == (0, 2, 0.5) and not row.differs
    row = t.loc[("random-64", "Overall")]  # 14 of 40 lost, none won: p = 2 / 2^14
    assert row.p == pytest.approx(2 / 2**14) and row.differs
    assert not t.loc[("random-32", "Overall")].differs  # identical answers
    assert t.loc[("random-32", "Overall")][["diff lo", "diff hi"]].tolist() == [0.0, 0.0]
    assert t.loc[("scope-64-alpha2", "Count")].options == "alpha=2.0"


def test_paired_tests_against_scope_pair_runs_at_the_same_budget_without_options(runs):
    t = stats.paired_tests([runs], against="scope", n_boot=200).set_index(["run", "column"])
    # scope-64 is the reference; the alpha variant is compared with it; random-32 has no SCOPE partner
    assert set(t.index.get_level_values("run")) == {"random-64", "scope-64-alpha2"}
    assert set(t.reference) == {"scope-64"}
    row = t.loc[("random-64", "Count")]  # random right on 4 SCOPE loses, SCOPE right on 8 random loses
    assert (row.only_run, row.only_reference) == (4, 8)
    p = 2 * sum(math.comb(12, k) for k in range(5)) / 2**12  # 2 * P(X <= 4), X ~ Bin(12, 1/2)
    assert row.p == pytest.approx(p) and row.differs == (p < 0.05)


def test_paired_bootstrap_for_metrics_that_are_not_a_percentage_correct(tmp_path):
    """POPE's F1: no McNemar; the paired bootstrap interval decides, identical runs give [0, 0]."""
    rng = np.random.default_rng(0)
    gold = ["yes" if i % 2 == 0 else "no" for i in range(200)]

    def pope(correct):
        return [
            {"idx": i, "answer": g, "label": g if ok else ("no" if g == "yes" else "yes"), "score": float(ok),
             "category": "random"}
            for i, (g, ok) in enumerate(zip(gold, correct))
        ]  # fmt: skip

    good = pope(rng.random(200) < 0.95)
    bad = pope(rng.random(200) < 0.6)
    same = stats.paired_bootstrap(good, good, "pope", ["f1"], n_boot=200)
    assert same["f1"] == (0.0, 0.0)
    lo, hi = stats.paired_bootstrap(bad, good, "pope", ["f1", "accuracy"], n_boot=300)["f1"]
    f1 = get_task("pope").aggregate
    assert lo < f1(bad)["f1"] - f1(good)["f1"] < hi < 0
    with pytest.raises(ValueError, match="different questions"):
        stats.paired_bootstrap(good[:-1], good, "pope", ["f1"])


def test_mark_puts_each_tests_symbol_after_the_cells_that_differ(runs):
    long = report.results_long([runs / r for r in ["none", "scope-64", "random-64", "random-32"]])
    table = report.paper_layout(long, intervals=False)
    vs_full = stats.paired_tests([runs], n_boot=100)
    vs_scope = stats.paired_tests([runs], against="scope", n_boot=100)
    marked = stats.mark(table, {"*": vs_full, "†": vs_scope}).set_index(["budget", "method", "kind"])
    assert marked.loc[(64, "SCOPE", "raw"), "Count"] == "60.0*"
    assert marked.loc[(64, "SCOPE", "raw"), "Exist. (POPE)"] == "100.0"
    assert (
        marked.loc[(64, "Random", "raw"), "Overall"] == "65.0*"
    )  # 26 of 40; vs SCOPE: 4 won, 10 lost, p > .05
    assert marked.loc[(576, "All tokens", "raw"), "Overall"] == "100.0"
    assert marked.loc[(64, "Random", "rel%"), "Count"] == pytest.approx(40.0)  # rel% rows untouched


def test_difference_table_reads_one_column(runs):
    t = stats.difference_table(stats.paired_tests([runs], n_boot=100), "Count", reference="all tokens")
    row = t[t.method == "SCOPE"].iloc[0] if (t.method == "SCOPE").sum() == 1 else None
    assert row is None  # SCOPE twice: with and without alpha, told apart by the options column
    t = t.set_index(["method", "options"])
    row = t.loc[("SCOPE", "")]
    assert row["all tokens"] == 100.0 and row["score"] == 60.0 and row["Δ"] == -40.0
    assert row["only this right / only all tokens right"] == "0 / 8" and row["differs"] == "yes"
    assert row["p (McNemar)"] == "0.0078"
    md = report.to_markdown(t.reset_index())
    assert "-40.0 [" in md  # the paired interval folded beside the difference
    with pytest.raises(ValueError, match="column"):
        stats.difference_table(stats.paired_tests([runs], n_boot=10), "Nope")


def test_paired_tests_refuse_a_reference_of_another_model_or_setting(runs):
    cfg_path = runs / "none" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model": "another-model", "seed": 1}))
    with pytest.raises(ValueError, match=r"model 'm' vs 'another-model', seed None vs 1"):
        stats.paired_tests([runs / "scope-64", runs / "none"], n_boot=50)
    # against SCOPE the unpruned run is not involved: still fine
    assert len(stats.paired_tests([runs], against="scope", n_boot=50)) > 0


def test_mcnemar_beyond_the_exact_sum_agrees_with_it(monkeypatch):
    a = np.array([1] * 30 + [0] * 50 + [1] * 20)  # 30 only a, 50 only b, 20 both right
    b = np.array([0] * 30 + [1] * 50 + [1] * 20)
    exact = 2 * sum(math.comb(80, j) for j in range(31)) / 2**80
    assert stats.mcnemar(a, b)["p"] == exact
    monkeypatch.setattr(stats, "EXACT_UP_TO", 10)  # the log-space sum
    assert stats.mcnemar(a, b)["p"] == pytest.approx(exact, rel=1e-12)
    big = np.array([1] * 9000 + [0] * 9500)
    assert 0 < stats.mcnemar(big, 1 - big)["p"] < 1e-3  # 9000 vs 9500 disagreements, in milliseconds
