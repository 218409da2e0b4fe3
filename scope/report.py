"""Results pipeline: run directories -> one long table -> the paper's layout -> Markdown / CSV.

    from scope import report
    long = report.results_long(["results/none", "results/scope-64"], ci=True)  # one row per run x column
    wide = report.paper_layout(long)                                             # budget x method, raw and rel%
    print(report.to_markdown(report.compare_to_paper(report.paper_layout(long, names="paper"), "table1")))
    report.save_table(wide, "03_table1_ours", source="MiniLLaVA, SynthBench test")  # CSV + Markdown
    report.paper_table("table1")                                                 # the paper's numbers

CLI: ``python -m scope.report RUN_DIR... [--paper table1] [--out figures/tables/mine]``.

Every table of the package goes through here; :mod:`scope.vis` only draws. The unpruned run is the one whose
method the registry (:mod:`scope.methods`) puts at the unpruned stage, and tables name methods by their
registry labels (``names="label"``, as the figures do) or their paper labels (``names="paper"``).

Confidence intervals: percentile bootstrap over questions (over image pairs for MME and over circular
groups for MMBench, the units their metrics are computed on), seeded, computed from the per-sample JSONL.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scope import lock
from scope.eval.rundir import read_jsonl
from scope.eval.tasks import get_task
from scope.eval.video_tasks import records_judge
from scope.methods import IN_LLM, UNPRUNED, find_method, from_paper_label, get_method, is_unpruned
from scope.paths import PAPER_DIR

# SynthBench families -> the paper benchmark each mirrors (column headers of our Table 1 analogue).
FAMILY_COLUMNS = {
    "existence": "Exist. (POPE)",
    "counting": "Count",
    "attribute": "Attr. (GQA)",
    "spatial": "Spatial",
    "reading": "Read (TextVQA)",
    "choice": "MC (MMB/SQA)",
}
OVERALL = "Overall"  # the column of SynthBench's overall accuracy
FAMILY_TASK = "synthbench"  # the task whose metrics split into the question families above
# printf format of floats in saved CSV tables (see ``save_table``)
CSV_FLOAT_FORMAT = "%.6g"


# ----------------------------------------------------------------------------------------------------------
# Names


def method_label(method: str) -> str:
    """How our tables and figures print a method: its registry label ("All tokens" for the unpruned model);
    unknown names unchanged."""
    record = find_method(method)
    return record.label if record is not None else method


def paper_label(method: str) -> str:
    """How the paper's tables name ``method`` (its record's paper label, else its label, else the name)."""
    record = find_method(method)
    if record is None:
        return method
    return record.paper_label or record.label


def json_options(options: Mapping | None) -> str:
    """Options of a run as a short stable string ("" when none): {"alpha": 0.5} -> "alpha=0.5"."""
    return ", ".join(f"{k}={v}" for k, v in sorted((options or {}).items()))


def column_name(task: str, metric: str) -> str:
    """The table column of a task's metric: the paper's header for a task's main metric (GQA, POPE, MME, ...),
    a SynthBench family's benchmark analogue ("counting/accuracy" -> "Count"), SynthBench's main metric
    :data:`OVERALL`, else "<header> <metric>"."""
    t = get_task(task)
    header = t.paper_column or t.name
    if metric in t.metric_columns:  # e.g. SEED's seed_image -> SEED-I
        return t.metric_columns[metric]
    if t.name == FAMILY_TASK:
        family, _, rest = metric.partition("/")
        if metric == t.main:
            return OVERALL
        if rest == "accuracy" and family in FAMILY_COLUMNS:
            return FAMILY_COLUMNS[family]
    return header if metric == t.main else f"{header} {metric}"


def paper_table(name: str) -> pd.DataFrame:
    """A table of the paper (data/paper/<name>.csv) as a DataFrame; ``name`` may be a prefix ("table1")."""
    files = sorted(PAPER_DIR.glob("*.csv"))
    hits = [f for f in files if f.stem == name] or [f for f in files if f.stem.startswith(name + "_")]
    if len(hits) != 1:
        raise ValueError(
            f"name={name!r} matches {[f.stem for f in hits]}; choose one of {[f.stem for f in files]}"
        )
    return pd.read_csv(hits[0])


def paper_shares(name: str = "table8") -> pd.DataFrame:
    """A paper table that gives budgets as token shares and raw scores only (Table 8: ``token_ratio`` "25%",
    ``Avg_rel`` "94.6 (+0.7)") in the layout of the others: ``budget`` the share as a float (0.25; the
    unpruned row 1.0 and named as :data:`scope.methods.UNPRUNED`'s paper label), ``kind`` "raw" rows and
    "rel%" rows (each score over the unpruned row's, x100) with ``Avg_rel``, the printed number without its
    gain."""
    paper = paper_table(name)
    check_columns(paper, ["method", "token_ratio", "Avg_rel"], name)
    cols = [c for c in paper.columns if c not in ("method", "token_ratio", "Avg_rel")]
    share = paper["token_ratio"].astype(str).str.rstrip("%").astype(float) / 100
    raw = (
        paper[cols]
        .astype(float)
        .assign(budget=share, method=paper["method"].where(share < 1, get_method(UNPRUNED).paper_label))
    )
    base = raw.loc[raw["budget"] == 1.0, cols].iloc[0]
    rel = raw.assign(**{c: 100 * raw[c] / base[c] for c in cols})
    rel["Avg_rel"] = paper["Avg_rel"].astype(str).str.split(" ").str[0].astype(float)
    out = pd.concat([raw.assign(kind="raw", Avg_rel=math.nan), rel.assign(kind="rel%")], ignore_index=True)
    return out[["budget", "method", "kind", *cols, "Avg_rel"]]


# ----------------------------------------------------------------------------------------------------------
# Reading runs


def run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path itself if it holds results.json, else its children that do."""
    out = []
    for p in map(Path, paths):
        if (p / "results.json").exists():
            out.append(p)
        elif p.is_dir():
            out += sorted(c for c in p.iterdir() if (c / "results.json").exists())
        else:
            raise ValueError(f"path={str(p)!r} is not a run directory (no results.json)")
    return out


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """config.json and results.json of a run directory; a missing or unreadable file raises ValueError
    naming it."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"dir": run_dir}
    for key in ("config", "results"):
        path = run_dir / f"{key}.json"
        try:
            out[key] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read {path}: {err}") from None
    return out


def method_name(name: str) -> str:
    """A run's method as the registry names it (aliases such as "pyramiddrop" -> "pdrop"); names this
    session has not registered are kept as they are."""
    record = find_method(name)
    return record.name if record is not None else name


def is_unpruned_run(cfg: dict) -> bool:
    """Whether a run's config.json describes the unpruned model."""
    name = cfg.get("method")
    record = find_method(name) if name is not None else None
    return name is None or (record is not None and is_unpruned(record.name))


def bootstrap_ci(
    records: Sequence[dict],
    task: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    metric: str | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a task metric (default: the task's main one, for video QA the main
    one of the judge that scored the records) over its records.

    Resamples whole units (a question, an MME image pair, an MMBench circular group) with replacement; a
    unit drawn twice enters the metric as two distinct units.
    """
    metric = metric or get_task(task).judged(records_judge(records)).main
    return bootstrap_cis(records, task, [metric], n_boot, seed, level)[metric]


def bootstrap_cis(
    records: Sequence[dict], task: str, metrics: Sequence[str], n_boot: int = 1000, seed: int = 0, level=0.95
) -> dict[str, tuple[float, float]]:
    """:func:`bootstrap_ci` of several metrics from the same resamples (each resample aggregated once)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} must be >= 1")
    t = get_task(task)
    units: dict[Any, list[dict]] = {}
    for r in records:
        units.setdefault(json.dumps(r.get(t.unit, r.get("idx"))), []).append(r)
    keys = list(units)
    if not keys:
        return {m: (math.nan, math.nan) for m in metrics}
    rng = random.Random(seed)
    stats: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(n_boot):
        sample = []
        for k, key in enumerate(rng.choices(keys, k=len(keys))):
            sample += [{**r, t.unit: f"{key}#{k}"} for r in units[key]]
        aggregated = t.aggregate(sample)
        for m in metrics:
            stats[m].append(aggregated.get(m, math.nan))
    lo, hi = int(math.floor((1 - level) / 2 * (n_boot - 1))), int(math.ceil((1 + level) / 2 * (n_boot - 1)))
    return {m: (sorted(v)[lo], sorted(v)[hi]) for m, v in stats.items()}


def metric_names(task: str, result: dict, metrics: str | Sequence[str]) -> list[str]:
    """The metrics of one task's results that become rows (see :func:`results_long`)."""
    reported = result.get("metrics", {})
    if metrics == "columns":
        if get_task(task).name != FAMILY_TASK:
            return [result["main"], *(m for m in get_task(task).metric_columns if m in reported)]
        families = [f"{f}/accuracy" for f in FAMILY_COLUMNS if f"{f}/accuracy" in reported]
        return families + [result["main"]]
    if metrics == "main":
        return [result["main"]]
    if metrics == "all":
        return list(reported)
    if isinstance(metrics, str):
        raise ValueError(f"metrics={metrics!r} must be 'columns', 'main', 'all' or a list of metric names")
    return [m for m in metrics if m in reported]


def _unpruned_budget(results: dict) -> int | None:
    """The visual tokens an unpruned run fed the LLM (mean over its tasks, rounded): its budget in tables."""
    kept = [r["mean_kept_tokens"] for r in results.values() if r.get("mean_kept_tokens") is not None]
    return round(sum(kept) / len(kept)) if kept else None


def results_long(
    paths: Iterable[str | Path],
    ci: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    metrics: str | Sequence[str] = "columns",
) -> pd.DataFrame:
    """Run directories of ``scope.eval`` (or folders holding them) -> one row per (run, task, metric).

    Columns: ``run, model, method, budget, options, task, metric, column, value, n, complete, visual_tokens,
    equivalent_tokens`` (+ ``lo``, ``hi``: a percentile bootstrap interval from the per-sample logs with
    ``ci=True``). ``column`` is the metric's table header (:func:`column_name`). The unpruned run has method
    :data:`scope.methods.UNPRUNED` and as budget the visual tokens it fed the LLM; ``options`` is
    :func:`json_options` of the run's options.

    ``metrics``: "columns" (the paper-like columns: SynthBench's question families and ``Overall``, every
    other task its headline metric), "main" (each task's headline metric: accuracy, POPE F1, MME total),
    "all" (every metric a task reports, e.g. POPE per split) or a list of metric names.
    """
    paths = list(paths)
    rows = []
    for d in run_dirs(paths):
        try:
            run = load_run(d)
        except ValueError as err:  # one broken run must not hide the others
            warnings.warn(f"skipped run {d}: {err}", stacklevel=2)
            continue
        cfg, results = run["config"], run["results"]["tasks"]
        unpruned = is_unpruned_run(cfg)
        budget = _unpruned_budget(results) if unpruned else cfg.get("budget")
        for task, res in results.items():
            n, complete, metrics_of_run = res["n"], res.get("complete", True), res.get("metrics", {})
            records = None
            if ci:
                records = read_jsonl(d / "samples" / f"{task}.jsonl", require=("idx",))
                if len(records) != n:
                    warnings.warn(
                        f"run {d.name}, task {task}: results.json counts {n} answers but the sample log "
                        f"holds {len(records)}; the run is incomplete (rerun its command to finish it); n "
                        "values and intervals are those of the logged answers",
                        stacklevel=2,
                    )
                    n, complete = len(records), False
                    metrics_of_run = (
                        get_task(task).aggregate(records)
                        if records
                        else dict.fromkeys([*res.get("metrics", {}), res["main"]], math.nan)
                    )
            names = metric_names(task, res, metrics)
            intervals = bootstrap_cis(records, task, names, n_boot=n_boot, seed=seed) if ci else {}
            for metric in names:
                row = {
                    "run": d.name,
                    "model": cfg.get("model"),
                    "protocol": cfg.get("protocol", "hf"),  # runs before protocols: the checkpoint's own
                    "method": UNPRUNED if unpruned else method_name(cfg["method"]),
                    "budget": budget,
                    "options": json_options(cfg.get("options")),
                    "task": task,
                    "metric": metric,
                    "column": column_name(task, metric),
                    "value": metrics_of_run.get(metric, res["value"] if metric == res["main"] else math.nan),
                    "n": n,
                    "complete": complete,
                    "visual_tokens": res.get("mean_kept_tokens"),
                    "equivalent_tokens": _equivalent_tokens(res, cfg),
                }
                if ci:
                    row["lo"], row["hi"] = intervals[metric]
                rows.append(row)
    if not rows:
        raise ValueError(f"paths={list(map(str, paths))} hold no finished runs (results.json)")
    out = pd.DataFrame(rows)
    out.attrs["protocol"] = ", ".join(sorted(set(out["protocol"])))  # save_table names it
    return out


def _equivalent_tokens(res: dict, cfg: dict) -> float | None:
    """A task's visual tokens per LLM layer: as recorded, else (runs recorded before every method had it) the
    tokens entering the LLM, which is the same number for every method but the in-LLM ones."""
    if res.get("equivalent_tokens") is not None:
        return res["equivalent_tokens"]
    record = None if is_unpruned_run(cfg) else find_method(cfg.get("method"))
    return None if record is not None and record.stage == IN_LLM else res.get("mean_kept_tokens")


# ----------------------------------------------------------------------------------------------------------
# The paper's layout


def check_columns(df: pd.DataFrame, needed: Sequence[str], arg: str = "data") -> None:
    """Raise a ValueError naming the columns of ``needed`` that ``df`` (the argument ``arg``) lacks."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{arg} lacks columns {missing}; it has {list(df.columns)}")


def _with_model(long: pd.DataFrame) -> pd.DataFrame:
    """``long`` with a ``model`` column usable as a group key (missing model names become "")."""
    model = long["model"].fillna("") if "model" in long.columns else ""
    return long.assign(model=model)


def unpruned_scores(long: pd.DataFrame) -> pd.Series:
    """The unpruned run's score per (model, column) of a :func:`results_long` table (models missing a name: "")."""
    long = _with_model(long)
    return long[long["method"] == UNPRUNED].groupby(["model", "column"])["value"].first()


def _relative_rows(raw: pd.DataFrame, long: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """rel% rows of the wide ``raw`` table: each score over its model's unpruned score (x100), plus Avg_rel."""
    base = unpruned_scores(long).replace(0.0, math.nan)
    if base.empty:
        raise ValueError(f"long has no unpruned run (method {UNPRUNED!r}); relative scores need one")
    models = raw.index.get_level_values("model")
    denom = base.unstack("column").reindex(index=models, columns=columns).to_numpy()
    rel = 100.0 * raw[columns] / denom
    rel["Avg_rel"] = rel[[c for c in columns if c != OVERALL]].mean(axis=1)
    return rel


def _with_intervals(
    raw: pd.DataFrame, long: pd.DataFrame, key: list[str], columns: list[str]
) -> pd.DataFrame:
    """``raw`` with ``<column> lo`` / ``<column> hi`` columns from the ``lo`` / ``hi`` of ``long``."""
    ends = []
    for end in ("lo", "hi"):
        wide = long.pivot_table(index=key, columns="column", values=end, aggfunc="first", sort=False)
        ends.append(wide.reindex(index=raw.index, columns=columns).add_suffix(f" {end}"))
    order = [f"{c} {end}" for c in columns for end in ("lo", "hi")]
    return pd.concat([raw, *ends], axis=1)[columns + order]


def paper_layout(
    runs: Iterable[str | Path] | pd.DataFrame,
    ci: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    relative: bool | None = None,
    names: str = "label",
    intervals: bool = True,
) -> pd.DataFrame:
    """Runs in the paper's layout: one row per (budget, method[, options], kind) with kind "raw" and, when
    ``relative``, "rel%" (% of the same model's unpruned run), one column per benchmark column of
    :func:`results_long`, and ``Avg_rel`` (mean rel% over the columns other than ``Overall``) as in Table 1.

    ``runs``: a :func:`results_long` table, or run directories (read with ``ci``, ``n_boot``, ``seed``).
    ``relative``: None -> whenever an unpruned run is present; True without one raises. ``names``: "label"
    (our figures' names: "All tokens", "SCOPE") or "paper" (the paper's: "Vanilla (upper bound)", "SCOPE
    (Ours)"). ``intervals``: raw rows also get ``<column> lo`` / ``<column> hi`` when ``runs`` has intervals.
    Unpruned rows first, then budgets high to low, then method; a ``model`` column only when several models
    are tabulated, an ``options`` column only when some run has options.
    """
    if names not in ("label", "paper"):
        raise ValueError(f"names={names!r} must be 'label' or 'paper'")
    long = runs if isinstance(runs, pd.DataFrame) else results_long(runs, ci=ci, n_boot=n_boot, seed=seed)
    check_columns(long, ["method", "budget", "options", "column", "value"], "long")
    if long.empty:
        raise ValueError("long has no rows to tabulate")
    long = _with_model(long)
    protocols = sorted(set(long["protocol"])) if "protocol" in long.columns else []
    if len(protocols) > 1:
        raise ValueError(f"long mixes runs of protocols {protocols}; tabulate one protocol at a time")
    if long["budget"].isna().any():  # a pruned run without a budget (e.g. PDrop's own ratio schedule)
        long = long.assign(budget=long["budget"].astype(object).where(long["budget"].notna(), "all"))
    columns = list(dict.fromkeys(long["column"]))
    key = ["model", "budget", "method", "options"]
    raw = long.pivot_table(index=key, columns="column", values="value", aggfunc="first", sort=False)
    raw = raw.reindex(columns=columns)
    if relative is None:
        relative = bool((long["method"] == UNPRUNED).any())
    parts = [raw.assign(kind="raw")]
    if intervals and {"lo", "hi"} <= set(long.columns):
        parts = [_with_intervals(raw, long, key, columns).assign(kind="raw")]
    if relative:
        parts.append(_relative_rows(raw, long, columns).assign(kind="rel%"))
    out = pd.concat(parts).reset_index()
    out["_pruned"] = out["method"] != UNPRUNED
    out["_b"] = [math.inf if b == "all" else b for b in out["budget"]]
    out["method"] = out["method"].map(method_label if names == "label" else paper_label)
    out = out.sort_values(
        ["model", "_pruned", "_b", "method", "options", "kind"],
        ascending=[True, True, False, True, True, True],
    )
    out = out.drop(columns=["_pruned", "_b"])
    if (out["options"] == "").all():
        out = out.drop(columns="options")
    if out["model"].nunique() <= 1:
        out = out.drop(columns="model")
    lead = [c for c in ["model", "budget", "method", "options", "kind"] if c in out.columns]
    out = out[lead + [c for c in out.columns if c not in lead]].reset_index(drop=True)
    out.columns.name = None
    out.attrs["protocol"] = protocols[0] if protocols else long.attrs.get("protocol")
    return out


def compare_to_paper(ours: pd.DataFrame, name: str = "table1") -> pd.DataFrame:
    """Our rows next to the paper's table ``name``, on the columns both have (a ``source`` column tells
    which is which). Intervals of ours are kept as ``<column> lo/hi``. Lay ours out with ``names="paper"``
    so that methods read the same in both."""
    paper = paper_table(name).copy()
    paper.insert(0, "source", "paper")
    ours = ours.copy()
    ours.insert(0, "source", "ours")
    shared = [c for c in paper.columns if c in ours.columns]
    extra = [c for c in ours.columns if c not in shared and c.endswith((" lo", " hi")) and c[:-3] in shared]
    out = pd.concat([paper[shared], ours[shared + extra]], ignore_index=True)
    out.attrs = dict(ours.attrs)  # the protocol of our rows (save_table names it)
    return out


# ----------------------------------------------------------------------------------------------------------
# Relative to the unpruned model, ours beside the paper's


def relative_scores(long: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """Pruned runs' scores as % of the unpruned run of the same model (the y axis of Table 1 / 2 figures).

    ``column`` given (e.g. :data:`OVERALL`): that column's rows of ``long``, ``value``/``lo``/``hi`` scaled
    and ``value`` renamed ``score``. ``column=None``: the mean rel% over all columns per (method, budget),
    the paper's ``Avg_rel``, as ``score``.
    """
    check_columns(long, ["method", "budget", "column", "value"], "long")
    base = unpruned_scores(long)
    if base.empty:
        raise ValueError(f"long has no unpruned run (method {UNPRUNED!r}); relative scores need one")
    keys = _with_model(long)
    denom = base.reindex(pd.MultiIndex.from_arrays([keys["model"], keys["column"]])).to_numpy()
    scaled = long.assign(**{c: 100 * long[c] / denom for c in ["value", "lo", "hi"] if c in long.columns})
    scaled = scaled[scaled["method"] != UNPRUNED].rename(columns={"value": "score"})
    if column is not None:
        return scaled[scaled["column"] == column]
    return scaled.groupby(["method", "budget"], as_index=False)["score"].mean()


def paper_relative(paper: pd.DataFrame, rescale: Callable[[Any], Any] | None = None) -> pd.DataFrame:
    """The rel% rows of a paper table (:func:`paper_table`) with our method names (pruned methods only) and
    ``Avg_rel`` as ``score``: the paper's side of :func:`side_by_side`. ``rescale`` maps the paper's budgets
    onto ours (e.g. LLaVA-NeXT's 640 of 2880 tokens to the same fraction of a smaller model's)."""
    check_columns(paper, ["budget", "method", "kind", "Avg_rel"], "paper")
    rel = paper[paper["kind"] == "rel%"].assign(method=lambda d: d["method"].map(from_paper_label))
    if rescale is not None:
        rel["budget"] = [rescale(b) for b in rel["budget"]]
    return rel[rel["method"] != UNPRUNED].rename(columns={"Avg_rel": "score"})


def side_by_side(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """One row per method, columns ``ours @<budget>`` and ``paper @<budget>`` (budgets high to low) of the
    ``score`` of :func:`relative_scores` and :func:`paper_relative`; methods by their labels."""
    check_columns(ours, ["method", "budget", "score"], "ours")
    check_columns(paper, ["method", "budget", "score"], "paper")
    side = ours.pivot_table(index="method", columns="budget", values="score").add_prefix("ours @")
    prel = paper.pivot_table(index="method", columns="budget", values="score").add_prefix("paper @")
    side = side.join(prel, how="outer")
    order = [
        f"{who} @{b}"
        for b in sorted(set(ours["budget"]) | set(paper["budget"]), reverse=True)
        for who in ("ours", "paper")
    ]
    side = side[[c for c in order if c in side.columns]].reset_index()
    side = side.sort_values("method", key=lambda names: names.str.lower(), kind="stable", ignore_index=True)
    side["method"] = side["method"].map(method_label)
    return side


def run_scores(long: pd.DataFrame, runs: Mapping[Any, str], key: str) -> pd.DataFrame:
    """``value``/``lo``/``hi`` of the named runs of ``long`` (one column's rows), one row per entry of
    ``runs`` (key -> run name) in its order, with the key in column ``key``; runs not in ``long`` are left
    out. E.g. an alpha sweep: ``run_scores(overall, {0.5: "scope-64-alpha0.5", 1.0: "scope-64"}, "alpha")``."""
    check_columns(long, ["run", "value"], "long")
    values = [c for c in ("value", "lo", "hi") if c in long.columns]
    rows = []
    for k, run in runs.items():
        r = long[long["run"] == run]
        if len(r):
            rows.append({key: k, **r.iloc[0][values].to_dict()})
    return pd.DataFrame(rows, columns=[key, *values])


# ----------------------------------------------------------------------------------------------------------
# Markdown and saved tables


def _fmt(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return format(float(value), floatfmt)
    return str(value)


def _fold_intervals(df: pd.DataFrame, floatfmt: str) -> pd.DataFrame:
    """``X lo`` / ``X hi`` columns folded into ``X`` as "v [lo, hi]" (just "v" where the interval is missing)."""
    for lo in [c for c in df.columns if isinstance(c, str) and c.endswith(" lo")]:
        base, hi = lo[:-3], lo[:-3] + " hi"
        if base not in df.columns or hi not in df.columns:
            continue
        df = df.copy()
        df[base] = [
            _fmt(v, floatfmt)
            if pd.isna(a)
            else f"{_fmt(v, floatfmt)} [{_fmt(a, floatfmt)}, {_fmt(b, floatfmt)}]"
            for v, a, b in zip(df[base], df[lo], df[hi])
        ]
        df = df.drop(columns=[lo, hi])
    return df


def to_markdown(df: pd.DataFrame, floatfmt: str = ".1f", index: bool = False) -> str:
    """A GitHub pipe table of ``df``: floats formatted with ``floatfmt``, missing values as "–", and
    ``X lo`` / ``X hi`` columns folded into ``X`` as "v [lo, hi]"."""
    if index:
        df = df.reset_index()
    df = _fold_intervals(df, floatfmt)
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, floatfmt).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def output_dir(figures_dir: str | Path | None = None) -> Path:
    """The folder figures and tables are written to (created): ``figures_dir``, else the repository's figures/."""
    if figures_dir is None:
        from scope.paths import FIGURES_DIR

        figures_dir = FIGURES_DIR
    path = Path(figures_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_name(name: str) -> None:
    """Refuse a figure/table name that is not a plain file stem."""
    if not name or "/" in name or "." in name or name.strip() != name:
        raise ValueError(f"name={name!r} must be a plain file stem like '01_theta_coverage'")


def save_table(
    df: pd.DataFrame,
    name: str,
    source: str,
    figures_dir: str | Path | None = None,
    title: str | None = None,
    floatfmt: str = ".1f",
) -> list[Path]:
    """Write ``<name>.csv`` and ``<name>.md`` (title, table as :func:`to_markdown`, ``Source:`` line).

    ``source`` says what produced the table, e.g. "MiniLLaVA (data/minillava), SynthBench test, 200 images";
    a table made from runs (:func:`results_long`, :func:`paper_layout`) adds the runs' protocol to it.
    The CSV keeps 6 significant digits: enough for any comparison the notebooks make, and it leaves out the
    float32 noise (~1e-7 relative) that otherwise changes the committed CSVs from one host to another.
    """
    check_name(name)
    if not source:
        raise ValueError("source must say which model and data produced the table")
    out = output_dir(figures_dir)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    df.to_csv(csv, index=False, float_format=CSV_FLOAT_FORMAT)
    protocol = df.attrs.get("protocol")
    source = f"{source}; protocol: {protocol}" if protocol else source
    source = f"{source}; environment: {lock.label()}"
    text = ([f"**{title}**", ""] if title else []) + [to_markdown(df, floatfmt), "", f"Source: {source}", ""]
    md.write_text("\n".join(text))
    return [csv, md]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scope.report", description="Tables from scope.eval run directories."
    )
    p.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    p.add_argument("--paper", default=None, help="put the paper's table (e.g. table1) beside ours")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.csv")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ci", action="store_true")
    args = p.parse_args(argv)
    long = results_long(args.runs, ci=not args.no_ci, n_boot=args.n_boot, seed=args.seed)
    df = paper_layout(long, names="paper")
    if args.paper:
        df = compare_to_paper(df, args.paper)
    md = to_markdown(df)
    unfinished = sorted(set(long.loc[~long["complete"].astype(bool), "run"]))
    if unfinished:
        md += f"\n\nIncomplete runs (not every question answered): {', '.join(unfinished)}"
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md + "\n")
        df.to_csv(out.with_suffix(".csv"), index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
