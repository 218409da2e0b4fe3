"""Paired tests: is the difference between two runs on the same questions more than noise?

Two runs of one benchmark answer the same questions, so their difference is measured far more precisely
than two separate confidence intervals suggest: most questions are answered alike by both, and only the
questions on which they disagree carry information. Two tests use that pairing:

* **McNemar's exact test** for a column that is a percentage of questions answered correctly (SynthBench's
  families and overall accuracy, GQA, SQA, ...): of the questions exactly one run gets right, how many went
  each way; with no real difference they split like fair coin flips (two-sided binomial p-value).
* **Paired bootstrap** of the difference for every column: resample the questions (the task's units: MME
  image pairs, MMBench circular groups) with replacement, the same draw for both runs, and take the
  percentile interval of the metric's difference. For columns that are not a plain percentage correct (POPE
  F1, MME totals) it is also the test: the difference is significant when the interval excludes 0.

    from scope import stats
    vs_full = stats.paired_tests(run_dirs)                      # every run against the unpruned one
    vs_scope = stats.paired_tests(run_dirs, against="scope")    # ... against SCOPE at the same budget
    table = stats.mark(report.paper_layout(long), {"*": vs_full, "†": vs_scope})

:func:`mark` puts a symbol after each cell that differs at the chosen level; :func:`difference_table` lays
the tests of one column out for reading. Many cells are tested at once: at 95%, about one true tie in twenty
is flagged by chance, so a single marker is weaker evidence than a pattern across budgets or columns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scope.eval.rundir import read_jsonl
from scope.eval.tasks import get_task
from scope.methods import UNPRUNED, get_method
from scope.report import (
    check_columns,
    column_name,
    is_unpruned_run,
    json_options,
    load_run,
    method_label,
    method_name,
    metric_names,
    run_dirs,
)

__all__ = ["mcnemar", "bootstrap_mean_ci", "paired_bootstrap", "per_question", "paired_tests", "mark",
           "difference_table"]  # fmt: skip

MCNEMAR, BOOTSTRAP = "McNemar", "paired bootstrap"
# how a table's source line names the tests behind its markers
TEST_NOTE = (
    "markers: paired tests on the same questions at 95% (McNemar's exact test for a % correct, "
    "else a paired bootstrap interval of the difference)"
)
# the columns of paired_tests (plus the notebooks' "against") that the saved test tables keep
SAVED_COLUMNS = ["against", "label", "budget", "options", "column", "value", "reference_value", "diff",
                 "diff lo", "diff hi", "only_run", "only_reference", "test", "p", "differs"]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The tests on plain arrays


def mcnemar(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """McNemar's exact test on per-question correctness (0/1) of two runs on the same questions.

    Returns ``only_a`` (questions only ``a`` gets right), ``only_b`` and ``p``: the two-sided exact binomial
    p-value, ``min(1, 2 * P(X <= min(only_a, only_b)))`` for X ~ Binomial(only_a + only_b, 1/2); 1 when
    the runs never disagree.
    """
    a, b = _binary(a, "a"), _binary(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same questions; got {a.size} and {b.size} scores")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    n, k = only_a + only_b, min(only_a, only_b)
    return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * _binomial_half_cdf(k, n))}


EXACT_UP_TO = 2000


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2): an exact big-integer sum up to ``EXACT_UP_TO`` disagreements,
    beyond that a sum in log space (the exact one takes seconds for the thousands of disagreements a large
    benchmark can have; the two agree to about 1e-13 relative)."""
    if n == 0:
        return 1.0
    if n <= EXACT_UP_TO:
        return sum(math.comb(n, j) for j in range(k + 1)) / 2**n
    i = np.arange(k + 1)
    log_terms = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
        - n * math.log(2)
    )
    top = log_terms.max()
    return float(math.exp(top) * np.exp(log_terms - top).sum())


def _binary(x: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float).reshape(-1)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold 0/1 correctness per question; got values {sorted(set(arr))[:5]}")
    return arr.astype(bool)


def _check_level(n_boot: int, level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} must be an int >= 1")


def _percentile(values: Sequence[float], level: float) -> tuple[float, float]:
    # the same order statistics as scope.report.bootstrap_cis, so paired and unpaired intervals read alike
    v = sorted(values)
    lo = int(math.floor((1 - level) / 2 * (len(v) - 1)))
    hi = int(math.ceil((1 + level) / 2 * (len(v) - 1)))
    return float(v[lo]), float(v[hi])


def bootstrap_mean_ci(
    diff: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question differences ``diff`` (resampled with
    replacement, ``n_boot`` times, seeded)."""
    _check_level(n_boot, level)
    diff = np.asarray(diff, dtype=float).reshape(-1)
    if diff.size == 0:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, diff.size, size=(n_boot, diff.size))
    return _percentile(diff[draws].mean(axis=1), level)


def paired_bootstrap(
    records_a: Sequence[dict],
    records_b: Sequence[dict],
    task: str,
    metrics: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile interval of ``metric(a) - metric(b)`` for each of ``metrics``, resampling the task's
    units (questions, MME pairs, MMBench groups) with one draw shared by both runs. Any metric the task's
    ``aggregate`` computes works (F1, MME totals); the records must cover the same units."""
    _check_level(n_boot, level)
    t = get_task(task)
    units_a, units_b = _units(records_a, t.unit), _units(records_b, t.unit)
    if set(units_a) != set(units_b):
        raise ValueError(
            f"the runs answered different questions of {task}: {len(units_a)} vs {len(units_b)} units"
        )
    keys = sorted(units_a)
    if not keys:
        return {m: (math.nan, math.nan) for m in metrics}
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(n_boot):
        draw = rng.integers(0, len(keys), size=len(keys))
        sample_a, sample_b = [], []
        for k, j in enumerate(draw):  # a unit drawn twice enters as two distinct units
            sample_a += [{**r, t.unit: f"{keys[j]}#{k}"} for r in units_a[keys[j]]]
            sample_b += [{**r, t.unit: f"{keys[j]}#{k}"} for r in units_b[keys[j]]]
        agg_a, agg_b = t.aggregate(sample_a), t.aggregate(sample_b)
        for m in metrics:
            diffs[m].append(agg_a.get(m, math.nan) - agg_b.get(m, math.nan))
    return {m: _percentile(v, level) for m, v in diffs.items()}


def _units(records: Sequence[dict], unit: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(json.dumps(r.get(unit, r.get("idx"))), []).append(r)
    return out


def per_question(records: Sequence[dict], task: str, metric: str, value: float | None = None):
    """The per-question 0/1 scores (ordered by question id) whose percentage is ``metric``, or None when
    the metric is something else (F1, MME totals, circular groups, soft VQA scores).

    A metric qualifies when the task resamples single questions, every score is 0 or 1, and the metric
    equals 100 x the mean score of all records or of those whose ``family`` / ``category`` is the metric's
    prefix ("counting/accuracy" -> family "counting"); ``value`` (default: the task's aggregate) is checked.
    """
    t = get_task(task)
    if t.unit != "idx" or not records:
        return None
    if value is None:
        value = t.aggregate(list(records)).get(metric)
    if value is None or not math.isfinite(value):
        return None
    prefix = metric.rsplit("/", 1)[0] if "/" in metric else None
    candidates = [list(records)]
    if prefix is not None:
        candidates = [[r for r in records if r.get(f) == prefix] for f in ("family", "category")]
    for subset in candidates:
        scores = [r.get("score") for r in subset]
        if subset and all(s in (0, 1) for s in scores) and abs(100 * np.mean(scores) - value) < 1e-6:
            ordered = sorted(subset, key=lambda r: str(r.get("qid", r["idx"])))
            return [str(r.get("qid", r["idx"])) for r in ordered], np.array([r["score"] for r in ordered])
    return None


# ----------------------------------------------------------------------------------------------------------
# Runs against runs


def paired_tests(
    runs: Iterable[str | Path],
    against: str = UNPRUNED,
    metrics: str | Sequence[str] = "columns",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Every run of ``runs`` (run directories or folders holding them) tested against its reference on the
    same questions, one row per (run, task, metric).

    ``against``: a method name. The unpruned method tests every pruned run against the unpruned one; any
    other method tests each run against that method's run at the same budget without options (runs
    without such a partner, and the partner itself, are left out). ``metrics`` as in
    :func:`scope.report.results_long`.

    Columns: ``run, reference, method, label, budget, options, task, metric, column, value, reference_value,
    diff`` (value - reference_value, in the metric's units) ``, diff lo, diff hi`` (paired bootstrap),
    ``only_run, only_reference`` (questions only one of them gets right; McNemar columns only), ``test``
    (:data:`MCNEMAR` or :data:`BOOTSTRAP`), ``p`` (McNemar's; NaN for the bootstrap) and ``differs``: McNemar
    p < 1 - ``level``, or for the bootstrap an interval that excludes 0.
    """
    _check_level(n_boot, level)
    against = get_method(against).name
    loaded = [_load(d) for d in run_dirs(runs)]
    rows = []
    for run in loaded:
        ref = _reference(run, loaded, against)
        if ref is None:
            continue
        _check_comparable(run, ref)
        for task, res in run["results"].items():
            if task in ref["results"]:
                rows += _compare_task(run, ref, task, metric_names(task, res, metrics), n_boot, seed, level)
    columns = ["run", "reference", "method", "label", "budget", "options", "task", "metric", "column",
               "value", "reference_value", "diff", "diff lo", "diff hi", "only_run", "only_reference",
               "test", "p", "differs"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _load(d: Path) -> dict[str, Any]:
    run = load_run(d)
    cfg = run["config"]
    unpruned = is_unpruned_run(cfg)
    kept = [r.get("mean_kept_tokens") for r in run["results"]["tasks"].values()]
    kept = [k for k in kept if k is not None]
    return {
        "dir": d,
        "name": d.name,
        "method": UNPRUNED if unpruned else method_name(cfg["method"]),
        "budget": (round(sum(kept) / len(kept)) if kept else None) if unpruned else cfg.get("budget"),
        "options": json_options(cfg.get("options")),
        "results": run["results"]["tasks"],
        "records": {},
        "setting": {k: cfg.get(k) for k in SAME_SETTING},
    }


# what a run and its reference must share for a paired test to compare pruning alone
SAME_SETTING = ("model", "revision", "protocol", "limit", "seed", "task_kwargs", "max_new_tokens", "judge")


def _check_comparable(run: dict, ref: dict) -> None:
    differ = {k: (v, ref["setting"][k]) for k, v in run["setting"].items() if v != ref["setting"][k]}
    if differ:
        raise ValueError(
            f"run {run['dir']} and its reference {ref['dir']} differ in more than pruning: "
            + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items())
            + "; test runs of one model and setting at a time"
        )


def _reference(run: dict, loaded: list[dict], against: str) -> dict | None:
    if against == UNPRUNED:
        if run["method"] == UNPRUNED:
            return None
        return next((r for r in loaded if r["method"] == UNPRUNED), None)
    if run["method"] == against and run["options"] == "":
        return None
    same = [
        r for r in loaded if r["method"] == against and r["options"] == "" and r["budget"] == run["budget"]
    ]
    return same[0] if same else None


def _records(run: dict, task: str) -> list[dict]:
    if task not in run["records"]:
        run["records"][task] = read_jsonl(run["dir"] / "samples" / f"{task}.jsonl", require=("idx",))
    return run["records"][task]


def _compare_task(run, ref, task, metrics, n_boot, seed, level) -> list[dict]:
    recs, ref_recs = _records(run, task), _records(ref, task)
    agg, ref_agg = get_task(task).aggregate(recs), get_task(task).aggregate(ref_recs)
    rows, generic = [], []
    for metric in metrics:
        value, ref_value = agg.get(metric, math.nan), ref_agg.get(metric, math.nan)
        row = {
            "run": run["name"], "reference": ref["name"], "method": run["method"],
            "label": method_label(run["method"]), "budget": run["budget"], "options": run["options"],
            "task": task, "metric": metric, "column": column_name(task, metric), "value": value,
            "reference_value": ref_value, "diff": value - ref_value, "only_run": math.nan,
            "only_reference": math.nan, "test": BOOTSTRAP, "p": math.nan,
        }  # fmt: skip
        mine, theirs = (
            per_question(recs, task, metric, value),
            per_question(ref_recs, task, metric, ref_value),
        )
        if mine is not None and theirs is not None:
            if mine[0] != theirs[0]:
                raise ValueError(
                    f"runs {run['name']} and {ref['name']} answered different questions of {task}"
                )
            test = mcnemar(mine[1], theirs[1])
            lo, hi = bootstrap_mean_ci(100 * (mine[1] - theirs[1]), n_boot, seed, level)
            row.update(only_run=test["only_a"], only_reference=test["only_b"], test=MCNEMAR, p=test["p"])
            row.update({"diff lo": lo, "diff hi": hi, "differs": test["p"] < 1 - level})
        else:
            generic.append(metric)
        rows.append(row)
    if generic:
        cis = paired_bootstrap(recs, ref_recs, task, generic, n_boot, seed, level)
        for row in rows:
            if row["metric"] in cis:
                lo, hi = cis[row["metric"]]
                row.update({"diff lo": lo, "diff hi": hi, "differs": bool(lo > 0 or hi < 0)})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Showing them


def mark(
    table: pd.DataFrame,
    tests: Mapping[str, pd.DataFrame],
    keys: Mapping[str, str] | None = None,
    floatfmt: str = ".1f",
) -> pd.DataFrame:
    """``table`` with each tested cell written as text, followed by the symbol of every test in ``tests``
    (symbol -> :func:`paired_tests` rows) that finds a difference there: "57.3*†".

    A cell is the row whose ``keys`` (table column -> tests column; default ``budget`` -> ``budget`` and
    ``method`` -> ``label``, plus ``options`` when both have it) match a test row, in the table column named
    by the test's ``column``. Rows of ``kind`` other than "raw" are left as they are. Untested cells are
    formatted too, so that a column reads alike.
    """
    keys = dict(keys or {"budget": "budget", "method": "label"})
    if "options" in table.columns and all("options" in t.columns for t in tests.values()):
        keys.setdefault("options", "options")
    check_columns(table, list(keys), "table")
    out = table.copy().astype(object)
    raw = out["kind"] == "raw" if "kind" in out.columns else pd.Series(True, index=out.index)
    columns = sorted(
        {c for t in tests.values() for c in t["column"]} & set(out.columns), key=list(out.columns).index
    )
    marks = {(tuple(_key(v) for v in row), col): "" for row in out.loc[raw, list(keys)].itertuples(index=False)
             for col in columns}  # fmt: skip
    for symbol, t in tests.items():
        check_columns(t, [*keys.values(), "column", "differs"], f"tests[{symbol!r}]")
        if "options" not in keys and "options" in t.columns:  # a table without options shows no variants
            t = t[t["options"] == ""]
        for row in t[t["differs"].astype(bool)].itertuples(index=False):
            k = (tuple(_key(getattr(row, c)) for c in keys.values()), row.column)
            if k in marks:
                marks[k] += symbol
    for i in out.index[raw]:
        k = tuple(_key(out.at[i, c]) for c in keys)
        for col in columns:
            v = out.at[i, col]
            text = (
                "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(float(v), floatfmt)
            )
            out.at[i, col] = text + marks[(k, col)]
    return out


def _key(v: Any) -> Any:
    # budgets come back as ints, floats or numpy scalars depending on the table: compare them as numbers
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return float(v)
    return v


def difference_table(tests: pd.DataFrame, column: str, reference: str = "reference") -> pd.DataFrame:
    """The tests of one table ``column`` laid out for reading: method label, budget (and options when any),
    the run's score, the reference's, the difference with its paired 95% interval (``diff lo`` / ``diff
    hi``, folded by :func:`scope.report.to_markdown`), McNemar's counts and p-value, and whether it differs.
    ``reference`` names the reference in the headers (e.g. "all tokens", "SCOPE")."""
    check_columns(
        tests, ["column", "label", "budget", "value", "reference_value", "diff", "differs"], "tests"
    )
    t = tests[tests["column"] == column]
    if t.empty:
        raise ValueError(f"column={column!r} is not among the tested columns {sorted(set(tests['column']))}")
    out = pd.DataFrame(
        {
            "method": t["label"],
            "budget": t["budget"],
            **({"options": t["options"]} if (t["options"] != "").any() else {}),
            "score": t["value"],
            reference: t["reference_value"],
            "Δ": t["diff"],
            "Δ lo": t["diff lo"],
            "Δ hi": t["diff hi"],
            f"only this right / only {reference} right": [
                "–" if math.isnan(a) else f"{int(a)} / {int(b)}"
                for a, b in zip(t["only_run"], t["only_reference"])
            ],
            "p (McNemar)": ["–" if math.isnan(p) else f"{p:.2g}" for p in t["p"]],
            "differs": ["yes" if d else "no" for d in t["differs"]],
        }
    )
    return out.reset_index(drop=True)
