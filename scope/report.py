"""Tables from run directories, in the paper's layout, with bootstrap confidence intervals.

    from scope import report
    long = report.results_table(["results/none", "results/scope-64"])      # one row per run x task
    wide = report.paper_layout(["results/none", "results/scope-64"])       # budget x method, raw and rel%
    print(report.to_markdown(report.compare_to_paper(wide, "table1")))
    report.paper_table("table1")                                            # the paper's numbers

CLI: ``python -m scope.report RUN_DIR... [--paper table1] [--out figures/tables/mine]``.

Confidence intervals: percentile bootstrap over questions (over image pairs for MME and over circular
groups for MMBench, the units their metrics are computed on), seeded, computed from the per-sample JSONL.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from scope.eval.rundir import read_jsonl
from scope.eval.tasks import get_task
from scope.methods import METHODS, UNPRUNED, is_unpruned
from scope.paths import PAPER_DIR


def paper_table(name: str) -> pd.DataFrame:
    """A table of the paper (data/paper/<name>.csv) as a DataFrame; ``name`` may be a prefix ("table1")."""
    files = sorted(PAPER_DIR.glob("*.csv"))
    hits = [f for f in files if f.stem == name] or [f for f in files if f.stem.startswith(name + "_")]
    if len(hits) != 1:
        raise ValueError(
            f"name={name!r} matches {[f.stem for f in hits]}; choose one of {[f.stem for f in files]}"
        )
    return pd.read_csv(hits[0])


# ----------------------------------------------------------------------------------------------------------
# Reading runs


def _run_dirs(paths: Iterable[str | Path]) -> list[Path]:
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
    """config.json and results.json of a run directory."""
    run_dir = Path(run_dir)
    return {
        "dir": run_dir,
        "config": json.loads((run_dir / "config.json").read_text()),
        "results": json.loads((run_dir / "results.json").read_text()),
    }


def is_unpruned_run(cfg: dict) -> bool:
    """Whether a run's config.json describes the unpruned model."""
    try:
        return is_unpruned(cfg.get("method"))
    except ValueError:  # a method this session has not registered: a pruned run all the same
        return False


def paper_label(method: str) -> str:
    """How the paper's tables name ``method`` (its record's paper label, else its label, else the name)."""
    record = METHODS.get(method)
    if record is None:
        return method
    return record.paper_label or record.label


def bootstrap_ci(
    records: Sequence[dict],
    task: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    metric: str | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a task metric (default: the task's main one) over its records.

    Resamples whole units (a question, an MME image pair, an MMBench circular group) with replacement; a
    unit drawn twice enters the metric as two distinct units.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} must be >= 1")
    t = get_task(task)
    metric = metric or t.main
    units: dict[Any, list[dict]] = {}
    for r in records:
        units.setdefault(json.dumps(r.get(t.unit, r.get("idx"))), []).append(r)
    keys = list(units)
    if not keys:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        sample = []
        for k, key in enumerate(rng.choices(keys, k=len(keys))):
            sample += [{**r, t.unit: f"{key}#{k}"} for r in units[key]]
        stats.append(t.aggregate(sample).get(metric, math.nan))
    stats.sort()
    lo = stats[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return (lo, hi)


def results_table(
    paths: Iterable[str | Path],
    ci: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    metrics: str | Sequence[str] = "main",
) -> pd.DataFrame:
    """One row per (run, task, metric): model, method, budget, options, task, metric, value, n, complete,
    visual tokens entering the LLM, layer-averaged tokens of in-LLM methods (and ci_low / ci_high with
    ``ci=True``).

    ``metrics``: "main" (each task's headline metric: accuracy, POPE F1, MME total), "all" (every metric a
    task reports, e.g. SynthBench per family, POPE per split, MME perception / cognition), or a list of names.
    """
    rows = []
    for d in _run_dirs(paths):
        run = load_run(d)
        cfg = run["config"]
        for task, r in run["results"]["tasks"].items():
            if metrics == "main":
                names = [r["main"]]
            elif metrics == "all":
                names = list(r["metrics"])
            else:
                names = [m for m in metrics if m in r["metrics"]]
            recs = read_jsonl(d / "samples" / f"{task}.jsonl") if ci else None
            for name in names:
                row = {
                    "run": d.name,
                    "model": cfg.get("model"),
                    "method": UNPRUNED if is_unpruned_run(cfg) else cfg["method"],
                    "budget": None if is_unpruned_run(cfg) else cfg.get("budget"),
                    "options": json.dumps(cfg.get("options") or {}, sort_keys=True),
                    "task": task,
                    "metric": name,
                    "value": r["metrics"].get(name, r["value"] if name == r["main"] else math.nan),
                    "n": r["n"],
                    "complete": r.get("complete", True),
                    "visual_tokens": r.get("mean_kept_tokens"),
                    "equivalent_tokens": r.get("equivalent_tokens"),
                }
                if ci:
                    row["ci_low"], row["ci_high"] = bootstrap_ci(
                        recs, task, n_boot=n_boot, seed=seed, metric=name
                    )
                rows.append(row)
    return pd.DataFrame(rows)


def _column(task: str) -> str:
    t = get_task(task)
    return t.paper_column or t.name


def paper_layout(
    paths: Iterable[str | Path] | pd.DataFrame, ci: bool = True, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Runs in the paper's layout: one row per (budget, method, kind) with kind "raw" and "rel%", one
    column per benchmark (paper names: GQA, MMB, MME, POPE, ...), and ``Avg_rel`` (mean rel%) as in Table 1.

    rel% is each score over the unpruned run's score of the same model and task (x100). The unpruned row's
    budget is the number of visual tokens it fed the LLM. With ``ci=True`` the raw rows also get
    ``<column> lo`` / ``<column> hi`` (bootstrap interval) columns.
    """
    long = paths if isinstance(paths, pd.DataFrame) else results_table(paths, ci=ci, n_boot=n_boot, seed=seed)
    if long.empty:
        raise ValueError("no runs to tabulate")
    long = long.copy()
    long["column"] = long["task"].map(_column)
    full = long[long["method"] == UNPRUNED].set_index(["model", "task"])["value"]
    full_tokens = long[long["method"] == UNPRUNED].groupby("model")["visual_tokens"].mean()
    rows: dict[tuple, dict[str, float]] = {}
    for _, r in long.iterrows():
        unpruned = r["method"] == UNPRUNED
        budget = full_tokens.get(r["model"]) if unpruned else r["budget"]
        budget = int(round(budget)) if budget is not None and not pd.isna(budget) else "all"
        key = (r["model"], budget, paper_label(r["method"]), r["options"])
        raw = rows.setdefault((*key, "raw"), {})
        raw[r["column"]] = r["value"]
        if "ci_low" in r and not pd.isna(r.get("ci_low")):
            raw[f"{r['column']} lo"], raw[f"{r['column']} hi"] = r["ci_low"], r["ci_high"]
        base = full.get((r["model"], r["task"]))
        if base is not None and not pd.isna(base) and base != 0:
            rows.setdefault((*key, "rel%"), {})[r["column"]] = 100.0 * r["value"] / base
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index = pd.MultiIndex.from_tuples(df.index, names=["model", "budget", "method", "options", "kind"])
    cols = [c for c in dict.fromkeys(long["column"]) if c in df.columns]
    rel = df.xs("rel%", level="kind")[cols] if "rel%" in df.index.get_level_values("kind") else None
    df["Avg_rel"] = math.nan
    if rel is not None:
        for idx, avg in rel.mean(axis=1).items():
            df.loc[(*idx, "rel%"), "Avg_rel"] = avg
    ordered = cols + [c for c in df.columns if c not in cols and c != "Avg_rel"] + ["Avg_rel"]
    df = df[ordered].reset_index()
    # the paper's order: budget high to low (unpruned first), then method
    df["_b"] = df["budget"].map(lambda b: math.inf if b == "all" else b)
    df["_u"] = df["method"] != paper_label(UNPRUNED)
    df = df.sort_values(
        ["model", "_u", "_b", "method", "options", "kind"], ascending=[True, True, False, True, True, True]
    )
    df = df.drop(columns=["_b", "_u"]).reset_index(drop=True)
    if (df["options"] == "{}").all():
        df = df.drop(columns="options")
    return df


def compare_to_paper(ours: pd.DataFrame, name: str = "table1") -> pd.DataFrame:
    """Our rows next to the paper's table ``name``, on the columns both have (a ``source`` column tells
    which is which). Intervals of ours are kept as ``<column> lo/hi``."""
    paper = paper_table(name).copy()
    paper.insert(0, "source", "paper")
    ours = ours.copy()
    ours.insert(0, "source", "ours")
    shared = [c for c in paper.columns if c in ours.columns]
    extra = [c for c in ours.columns if c not in shared and c.endswith((" lo", " hi")) and c[:-3] in shared]
    return pd.concat([paper[shared], ours[shared + extra]], ignore_index=True)


def to_markdown(df: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub Markdown table; ``X lo`` / ``X hi`` columns are folded into ``X`` as "v [lo, hi]"."""
    df = df.copy()
    for c in [c for c in df.columns if isinstance(c, str) and c.endswith(" lo")]:
        base, hi = c[:-3], c[:-3] + " hi"
        if base in df.columns and hi in df.columns:

            def fmt(row, base=base, c=c, hi=hi):
                v = row[base]
                if pd.isna(row[c]):
                    return _fmt(v, digits)
                return f"{_fmt(v, digits)} [{_fmt(row[c], digits)}, {_fmt(row[hi], digits)}]"

            df[base] = df.apply(fmt, axis=1)
            df = df.drop(columns=[c, hi])
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" if df[c].dtype == object else "---:" for c in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return "" if v is None else str(v)


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
    df = paper_layout(args.runs, ci=not args.no_ci, n_boot=args.n_boot, seed=args.seed)
    if args.paper:
        df = compare_to_paper(df, args.paper)
    md = to_markdown(df)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md + "\n")
        df.to_csv(out.with_suffix(".csv"), index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
