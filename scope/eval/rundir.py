"""Run directories: what ``scope.eval`` writes, and how it is read back, merged and re-scored.

A run directory holds::

    config.json               everything needed to trace a number (model, revision, method, options, seed,
                              limits, package versions, git commit)
    samples/<task>.jsonl      one record per question, in dataset order (merged from the rank files)
    samples/<task>.rank<r>.jsonl   written as the run goes (one per process); merged and removed at the end
    results.json              the metrics of every task

Records are appended and flushed batch by batch, so an interrupted run loses at most the batch in flight.
Running the same command again resumes: questions whose dataset index is already logged are skipped, a
half-written last line is cut off, and merging de-duplicates by index, so nothing is lost or counted twice.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from scope.eval.tasks import Task, parse_tasks


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("scope-pruning", "torch", "transformers", "datasets", "accelerate", "tokenizers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    from scope.paths import REPO_ROOT

    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def checkpoint_fingerprint(path: str | Path) -> str | None:
    """``"sha256:<12 hex>"`` of a local checkpoint's weight files (names, sizes, first and last MiB), or None
    when ``path`` is not a local folder.

    A local folder has no hub revision; this stands in for one, so a retrained checkpoint never resumes (or
    reuses) runs of the previous weights.
    """
    import hashlib

    if not str(path):  # Path("") is the working directory, not a checkpoint
        return None
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:  # name, size, first and last MiB: cheap for a 14 GB folder, and retraining changes them
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return "sha256:" + h.hexdigest()[:12]


def model_identity(model: Any, model_id: str | None = None) -> tuple[str | None, str | None]:
    """(model id or path, hub revision if known, else the fingerprint of a local checkpoint) for config.json."""
    cfg = getattr(model, "config", None)
    name = model_id or getattr(cfg, "_name_or_path", None) or type(model).__name__
    revision = getattr(cfg, "_commit_hash", None) or checkpoint_fingerprint(str(name))
    return str(name), revision


def repair_tail(path: Path) -> None:
    """Cut a half-written last line (the process died mid-write) so that appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a malformed line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def _task_files(out_dir: Path, task: str) -> tuple[Path, list[Path]]:
    sdir = out_dir / "samples"
    return sdir / f"{task}.jsonl", sorted(sdir.glob(f"{task}.rank*.jsonl"))


def logged_records(out_dir: Path, task: str) -> dict[int, dict]:
    """Every record logged for ``task`` so far (merged file first, then rank files), by dataset index."""
    merged, ranks = _task_files(out_dir, task)
    recs: dict[int, dict] = {}
    for p in [merged, *ranks]:
        for r in read_jsonl(p):
            recs.setdefault(int(r["idx"]), r)
    return recs


def merge_task(out_dir: str | Path, task: str) -> list[dict]:
    """Merge rank files into ``samples/<task>.jsonl`` (sorted by index, de-duplicated) and remove them."""
    out_dir = Path(out_dir)
    merged, ranks = _task_files(out_dir, task)
    recs = [r for _, r in sorted(logged_records(out_dir, task).items())]
    merged.parent.mkdir(parents=True, exist_ok=True)
    tmp = merged.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, merged)  # atomic: the old merged file or the new one, never half of it
    for p in ranks:
        p.unlink(missing_ok=True)
    return recs


def score_records(task: Task, records: list[dict], n_expected: int | None = None) -> dict[str, Any]:
    """Aggregate a task's records into its results.json entry."""
    metrics = task.aggregate(records) if records else {}
    kept = [r["kept_tokens"] for r in records if r.get("kept_tokens") is not None]
    return {
        "main": task.main,
        "value": metrics.get(task.main, float("nan")),
        "metrics": metrics,
        "n": len(records),
        "n_expected": n_expected,
        "complete": n_expected is None or len(records) == n_expected,
        "mean_kept_tokens": sum(kept) / len(kept) if kept else None,
    }


def rescore(out_dir: str | Path) -> dict[str, Any]:
    """Recompute results.json of a run directory from its JSONL logs (merging rank files first)."""
    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    old = json.loads((out_dir / "results.json").read_text()) if (out_dir / "results.json").exists() else {}
    results = {"config": brief_config(cfg), "tasks": {}}
    for task in parse_tasks(cfg["tasks"]):
        recs = merge_task(out_dir, task.name)
        n_exp = old.get("tasks", {}).get(task.name, {}).get("n_expected")
        results["tasks"][task.name] = score_records(task, recs, n_exp)
    write_json(out_dir / "results.json", results)
    return results


def brief_config(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in ("model", "method", "budget", "options", "limit", "seed")}


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table (task, metric, value, n, kept tokens) of a results dict."""
    cfg = results.get("config", {})
    head = f"model={cfg.get('model')} method={cfg.get('method')} budget={cfg.get('budget')}"
    rows = ["| task | metric | value | n | visual tokens |", "|---|---|---:|---:|---:|"]
    for name, r in results.get("tasks", {}).items():
        kept = r.get("mean_kept_tokens")
        rows.append(
            f"| {name} | {r['main']} | {r['value']:.2f} | {r['n']}{'' if r.get('complete', True) else ' (incomplete)'} | "
            f"{'' if kept is None else f'{kept:.1f}'} |"
        )
    return head + "\n" + "\n".join(rows)
