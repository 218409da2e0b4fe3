"""Execute the numbered notebooks in order with papermill: ``make reproduce`` (and its smoke test).

    python -m scope.reproduce                      # all notebooks -> notebooks/executed/, figures/
    python -m scope.reproduce --smoke --out /tmp/s # tiny limits; executed copies + figures under /tmp/s
    python -m scope.reproduce --only 01,02 -p limit=50

Every notebook gets the parameters ``smoke``, ``figures_dir`` and ``results_dir`` (plus any ``-p key=value``).
A full run writes the repository's figures; a smoke run, or any run with ``--out``, writes everything under
the output folder so tests never touch the repository. The first failing notebook stops the run with a
non-zero exit status and says where its partly executed copy is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scope.paths import FIGURES_DIR, NOTEBOOKS_DIR, REPO_ROOT

# "NN_name.ipynb", or "NNx_name.ipynb" with one lowercase letter for a notebook placed right after NN
# (00b follows 00): sorting by name keeps that order, "--only 00b" selects it
NOTEBOOK_PATTERN = re.compile(r"^(\d\d[a-z]?)_[\w-]+\.ipynb$")
# The kernels inherit these: nothing may try the network, tokenizers must not fork threads, and progress
# bars (model loading, evaluation) would only clutter the executed notebooks. With ipywidgets installed
# tqdm.auto draws notebook widgets, which ignore TQDM_DISABLE; the Hugging Face libraries' own switch
# turns off theirs (transformers' "Loading weights").
OFFLINE_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _shown(path: Path) -> str:
    """Repository paths are passed relative to its root (the notebooks resolve them from there), so the
    committed executed notebooks do not carry this machine's absolute paths."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def choose_threads(requested: int | None) -> int | None:
    """Threads per kernel: ``requested``, else 1 when other processes already keep the CPUs busy, else None
    (torch's default, one per core).

    Measured on a shared 2-core machine: with one other busy process, a 2-thread matmul ran 5x and a
    MiniLLaVA prefill 36x slower than with 1 thread (the threads wait on each other), so a busy machine
    gets one thread. Thread count changes float summation order only, not the method.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads={requested} must be >= 1")
        return requested
    cpus = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy >= 0.5 * cpus or cpus == 1 else None


def discover(notebooks_dir: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    """The ``NN_name.ipynb`` (and ``NNx_name.ipynb``) notebooks of ``notebooks_dir`` in numeric order, optionally
    only those numbered in ``only`` (``"01"``, ``"1"``, ``"00b"``)."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise ValueError(f"notebooks_dir={str(notebooks_dir)!r} is not a directory")
    found = sorted(p for p in notebooks_dir.iterdir() if NOTEBOOK_PATTERN.match(p.name))
    if only:
        wanted = {s.zfill(3 if s[-1:].isalpha() else 2) for s in only}
        bad = sorted(w for w in wanted if not re.fullmatch(r"\d\d[a-z]?", w))
        if bad:
            raise ValueError(f"only={only} must be notebook numbers like 01,02 or 00b")
        missing = wanted - {NOTEBOOK_PATTERN.match(p.name).group(1) for p in found}
        if missing:
            raise ValueError(f"only={only}: no notebook numbered {sorted(missing)} in {notebooks_dir}")
        found = [p for p in found if NOTEBOOK_PATTERN.match(p.name).group(1) in wanted]
    return found


# tables that hold measurements (times), not results: they differ from one run to the next
MEASURED_TABLES = ("06_latency.csv",)


def committed_tables(figures_dir: Path = FIGURES_DIR) -> dict[str, bytes]:
    """The CSV tables of ``figures/`` as committed (git HEAD); as on disk where git cannot tell."""
    import subprocess

    rel = Path(figures_dir).resolve().relative_to(REPO_ROOT).as_posix()
    try:
        names = subprocess.run(
            ["git", "ls-tree", "--name-only", "HEAD", f"{rel}/"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.split()
        out = {}
        for name in (n for n in names if n.endswith(".csv")):
            show = subprocess.run(
                ["git", "show", f"HEAD:{name}"], cwd=REPO_ROOT, capture_output=True, check=True
            )
            out[Path(name).name] = show.stdout
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return {p.name: p.read_bytes() for p in sorted(Path(figures_dir).glob("*.csv"))}


def compare_tables(committed: dict[str, bytes], figures_dir: Path) -> dict[str, list[str]]:
    """Regenerated CSV tables against the committed ones: {"equal": [...], "differ": [...], "new": [...],
    "measured": [...]} (measured tables are expected to differ and are listed apart)."""
    out: dict[str, list[str]] = {"equal": [], "differ": [], "new": [], "measured": []}
    for path in sorted(Path(figures_dir).glob("*.csv")):
        if path.name in MEASURED_TABLES:
            out["measured"].append(path.name)
        elif path.name not in committed:
            out["new"].append(path.name)
        else:
            out["equal" if path.read_bytes() == committed[path.name] else "differ"].append(path.name)
    return out


def _print_comparison(result: dict[str, list[str]]) -> None:
    print(f"\n[reproduce] {len(result['equal'])} regenerated tables equal the committed ones", end="")
    print(f"; {', '.join(result['measured'])} measured (differs by run)" if result["measured"] else "")
    if result["differ"]:
        print(f"[reproduce] DIFFERENT from the committed tables: {', '.join(result['differ'])}")
    if result["new"]:
        print(f"[reproduce] new tables (not committed yet): {', '.join(result['new'])}")
    if not result["differ"] and not result["new"]:
        print("[reproduce] every result table is as committed")


def _parse_param(text: str) -> tuple[str, object]:
    """``key=value`` with value read as YAML (so 50 -> int, [64,128] -> list, true -> bool)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"-p {text!r}: expected key=value")
    return key, yaml.safe_load(value)


def run_notebooks(
    notebooks: list[Path],
    executed_dir: Path,
    parameters: dict,
    results_root: Path,
    kernel_name: str | None = None,
) -> list[tuple[str, float]]:
    """Execute ``notebooks`` one after another; returns (name, seconds) per notebook.

    Raises ``RuntimeError`` naming the notebook (and its partly executed copy) on the first failure.
    """
    import papermill as pm

    executed_dir.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float]] = []
    for nb in notebooks:
        out = executed_dir / nb.name
        # One results root for all notebooks: 05 and 07 reuse the runs 03 already finished.
        params = {"results_dir": _shown(results_root), **parameters}
        print(f"[reproduce] {nb.name} ...", flush=True)
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                str(nb),
                str(out),
                parameters=params,
                kernel_name=kernel_name,
                cwd=str(nb.parent),
                progress_bar=False,
                log_output=False,
            )
        except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
            seconds = time.perf_counter() - start
            raise RuntimeError(
                f"notebook {nb.name} failed after {seconds:.1f} s; executed copy with the error: {out}\n{err}"
            ) from err
        seconds = time.perf_counter() - start
        timings.append((nb.name, seconds))
        print(f"[reproduce] {nb.name} done in {seconds:.1f} s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scope.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny limits (passes smoke=True); for CI")
    parser.add_argument("--out", type=Path, help="write executed notebooks, figures and results here")
    parser.add_argument("--only", help="comma-separated notebook numbers, e.g. 01,02 or 00b")
    parser.add_argument("-p", "--param", action="append", type=_parse_param, default=[], metavar="KEY=VALUE")
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's own)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per notebook (default: 1 on a busy machine)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep finished evaluation runs in the results folder (full runs)",
    )
    args = parser.parse_args(argv)

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    threads = choose_threads(args.threads) if "OMP_NUM_THREADS" not in os.environ or args.threads else None
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        notebooks = discover(args.notebooks_dir, args.only.split(",") if args.only else None)
    except ValueError as err:
        parser.error(str(err))
    if not notebooks:
        print(f"[reproduce] no NN_*.ipynb notebooks in {args.notebooks_dir}; nothing to do")
        return 0

    out = args.out
    if out is None and args.smoke:  # a smoke run must never dirty the repository
        out = Path(tempfile.mkdtemp(prefix="scope-smoke-"))
    if out is not None:
        out = out.resolve()
        executed_dir, figures_dir, results_root = out, out / "figures", out / "results"
    else:
        executed_dir = args.notebooks_dir / "executed"
        figures_dir, results_root = FIGURES_DIR, REPO_ROOT / "results" / "reproduce"
        # Committed figures must match the committed code: start from fresh evaluation runs.
        if results_root.exists() and not args.resume:
            shutil.rmtree(results_root)
    # the committed figures are made on the CPU (a GPU's arithmetic gives other near-ties): -p device=auto
    # to use a GPU
    parameters = {"smoke": bool(args.smoke), "figures_dir": _shown(figures_dir), "device": "cpu"}
    parameters.update(dict(args.param))
    mode = "smoke" if args.smoke else "full"
    print(
        f"[reproduce] {len(notebooks)} notebooks, {mode} mode, "
        f"threads: {os.environ.get('OMP_NUM_THREADS', 'torch default')}; executed copies -> {executed_dir}; "
        f"figures -> {figures_dir}",
        flush=True,
    )

    committed = committed_tables() if not args.smoke else {}
    total = time.perf_counter()
    try:
        timings = run_notebooks(notebooks, executed_dir, parameters, results_root, args.kernel)
    except RuntimeError as err:
        print(f"[reproduce] FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    total = time.perf_counter() - total
    width = max(len(name) for name, _ in timings)
    print(f"\n{'notebook':<{width}}  seconds")
    for name, seconds in timings:
        print(f"{name:<{width}}  {seconds:7.1f}")
    print(f"{'total':<{width}}  {total:7.1f}  ({mode} mode)")
    if not args.smoke:  # smoke runs use tiny limits: their tables are not the committed ones
        _print_comparison(compare_tables(committed, figures_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
