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

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import warnings
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
    """``"sha256:<12 hex>"`` of a local checkpoint's weight files (names and full contents), or None when
    ``path`` is not a local folder.

    A local folder has no hub revision; this stands in for one, so a retrained or altered checkpoint never
    resumes (or reuses) runs of other weights. Every byte is hashed (a flipped byte anywhere changes it);
    each file's digest is cached for the process by path, size and modification time, so a 14 GB folder is
    read once.
    """
    if not str(path):  # Path("") is the working directory, not a checkpoint
        return None
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{_file_digest(f)}".encode())
    return "sha256:" + h.hexdigest()[:12]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


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


def json_value(text: Any) -> Any:
    """A command-line value read as JSON when it is JSON (``0.5`` -> 0.5, ``[8,16]`` -> a list), else kept
    as written (``add`` -> "add")."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_jsonl(path: str | Path, require: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file. A malformed line (a crash mid-write), or a record lacking a field of
    ``require``, is skipped with a warning naming the file and line: it counts as not done, so a resume
    recomputes it."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("}"):  # a half-written last line is expected after a crash: no noise
                    continue
                rec = None
            missing = [k for k in require if not isinstance(rec, dict) or k not in rec]
            if rec is None or missing:
                what = "is not a JSON object" if rec is None else f"lacks {missing}"
                warnings.warn(f"{path}:{number} {what}; skipped (a resume recomputes it)", stacklevel=2)
                continue
            out.append(rec)
    return out


def _task_files(out_dir: Path, task: str) -> tuple[Path, list[Path]]:
    sdir = out_dir / "samples"
    return sdir / f"{task}.jsonl", sorted(sdir.glob(f"{task}.rank*.jsonl"))


def logged_records(out_dir: Path, task: str) -> dict[int, dict]:
    """Every record logged for ``task`` so far (merged file first, then rank files), by dataset index."""
    merged, ranks = _task_files(out_dir, task)
    recs: dict[int, dict] = {}
    for p in [merged, *ranks]:
        for r in read_jsonl(p, require=("idx",)):
            recs.setdefault(int(r["idx"]), r)
    return recs


def merge_task(out_dir: str | Path, task: str) -> list[dict]:
    """Merge rank files into ``samples/<task>.jsonl`` (sorted by index, de-duplicated) and remove them."""
    out_dir = Path(out_dir)
    merged, ranks = _task_files(out_dir, task)
    recs = [r for _, r in sorted(logged_records(out_dir, task).items())]
    merged.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(merged, "".join(json.dumps(r) + "\n" for r in recs))
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
    """Recompute results.json of a run directory from its JSONL logs (merging rank files first). Takes the
    directory's lock: a run still writing there is not merged under its feet."""
    out_dir = Path(out_dir)
    with RunLock(out_dir):
        cfg = json.loads((out_dir / "config.json").read_text())
        old = read_results(out_dir / "results.json")
        results = {"config": brief_config(cfg), "tasks": {}}
        for task in parse_tasks(cfg["tasks"]):
            task = task.judged(cfg.get("judge"))  # video QA: the run's judge names the main metric
            recs = merge_task(out_dir, task.name)
            n_exp = old.get("tasks", {}).get(task.name, {}).get("n_expected")
            results["tasks"][task.name] = score_records(task, recs, n_exp)
        write_json(out_dir / "results.json", results)
    return results


def read_results(path: Path) -> dict:
    """A run's results.json, or {} when it is missing or unreadable (a warning names the file: its tasks are
    scored again from their logs)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        warnings.warn(f"{path} is unreadable ({err}); rewriting it from the sample logs", stacklevel=2)
        return {}


def brief_config(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in ("model", "protocol", "method", "budget", "options", "limit", "seed")}


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    """Write through a uniquely named temporary file and rename: readers see the old file or the new one,
    and concurrent writers never share a temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------
# opening a run directory: identity, overwrite, lock
# --------------------------------------------------------------------------------------------------------


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def open_run_dir(
    out_dir: Path, config: dict, identity: tuple[str, ...], overwrite: bool, defaults: dict | None = None
) -> dict:
    """Start or resume the run in ``out_dir`` and write ``config.json``.

    A run already there resumes only if every field of ``identity`` agrees (a field its config.json lacks
    counts as its value in ``defaults``); otherwise it is refused with the differences listed.
    ``overwrite`` deletes everything of the old run first (logs, results, config).
    """
    cfg_path = out_dir / "config.json"
    if overwrite:
        clear_run(out_dir)
    elif cfg_path.exists():
        old = {**(defaults or {}), **json.loads(cfg_path.read_text())}
        diff = {k: (old.get(k), config[k]) for k in identity if old.get(k) != _comparable(config[k])}
        if diff:
            lines = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"out_dir={str(out_dir)!r} holds a run with another configuration ({lines}); use a new "
                "out_dir or overwrite=True (--overwrite)"
            )
        config["tasks"] = list(dict.fromkeys(old.get("tasks", []) + config["tasks"]))
        config["started"] = old.get("started", config["started"])
        config["resumed"] = old.get("resumed", 0) + 1
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    write_json(cfg_path, config)
    return config


def clear_run(out_dir: Path) -> None:
    """Remove what a run wrote in ``out_dir`` (config, results, sample logs); other files stay."""
    for p in [out_dir / "config.json", out_dir / "results.json", *(out_dir / "samples").glob("*.jsonl")]:
        p.unlink(missing_ok=True)


class RunLock:
    """One process at a time in a run directory: ``<out_dir>/.lock`` names the holder (host, pid, start).

    A second process is refused with the holder's name. A lock left by a dead process on this host is
    taken over; one from another host must be removed by hand once that run is known to be gone.
    """

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".lock"
        self.held = False

    def __enter__(self) -> RunLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def acquire(self) -> RunLock:
        """Take the lock (RuntimeError naming the holder if another live process has it); returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_holder(self.path)
                if _alive(holder, self.path):
                    raise RuntimeError(
                        f"run directory {str(self.path.parent)!r} is in use by process {holder.get('pid')} "
                        f"on {holder.get('host')} (since {holder.get('since')}); wait for it to finish, or "
                        f"delete {self.path} if that process is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process died
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _alive(holder: dict, path: Path) -> bool:
    if not holder:  # empty or garbage: being written this instant, or its writer died between create and write
        try:
            return _dt.datetime.now().timestamp() - path.stat().st_mtime < 10
        except OSError:
            return False
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True  # another machine: we cannot tell, so it counts as held
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table (task, metric, value, n, kept tokens) of a results dict."""
    cfg = results.get("config", {})
    head = f"model={cfg.get('model')} protocol={cfg.get('protocol')} method={cfg.get('method')} budget={cfg.get('budget')}"
    rows = ["| task | metric | value | n | visual tokens |", "|---|---|---:|---:|---:|"]
    for name, r in results.get("tasks", {}).items():
        kept = r.get("mean_kept_tokens")
        rows.append(
            f"| {name} | {r['main']} | {r['value']:.2f} | {r['n']}{'' if r.get('complete', True) else ' (incomplete)'} | "
            f"{'' if kept is None else f'{kept:.1f}'} |"
        )
    return head + "\n" + "\n".join(rows)
