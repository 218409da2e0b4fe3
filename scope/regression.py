"""A small fixed sweep on the embedded MiniLLaVA whose answers must not drift (``make test`` checks it).

    python -m scope.regression           # run the sweep and compare with tests/data/regression.csv
    python -m scope.regression --write   # after a deliberate change: rewrite it, and review the diff

The sweep was fixed before its first measurement: the first 24 questions of the SynthBench test split
(4 per question family), the unpruned model and six methods at 64 and 16 tokens (coverage-only included:
its many near-ties make it the most sensitive to arithmetic drift), batch size 8, seed 0, float32, one
thread. The table keeps every answer, so a change that moves one pick enough to change one answer shows as
one changed line. Under the environment lock (:mod:`scope.lock`) the run must match it byte for byte.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from scope.paths import REPO_ROOT

__all__ = ["EXPECTED", "SWEEP_FILE", "run", "table_text", "diff", "main"]

EXPECTED = REPO_ROOT / "tests" / "data" / "regression.csv"
# the sweep's definition lives beside its expected table, and changes only with it
SWEEP_FILE = REPO_ROOT / "tests" / "data" / "regression_sweep.json"
# what must be as locked for the answers to be byte-identical
NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "pillow")


def run(out_root: str | Path | None = None) -> pd.DataFrame:
    """Run the sweep of :data:`SWEEP_FILE` on the embedded MiniLLaVA; one row per (run, question): the answer
    and its score."""
    import scope
    from scope.eval import read_jsonl, sweep

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the summation order of one thread, whatever the machine
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(out_root or tmp)
            model, processor = scope.load(device="cpu")
            spec = json.loads(SWEEP_FILE.read_text())
            runs = sweep(model, processor, spec.pop("tasks"), out_root=root, progress=False, **spec)
            rows = []
            for name in runs:
                for r in read_jsonl(root / name / "samples" / "synthbench.jsonl"):
                    rows.append({"run": name, "idx": r["idx"], "family": r["family"], "answer": r["prediction"],
                                 "score": r["score"], "kept_tokens": r["kept_tokens"]})  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows)


def table_text(df: pd.DataFrame) -> str:
    """The expected table's text: CSV, one line per (run, question)."""
    return df.to_csv(index=False, lineterminator="\n")


def diff(text: str, expected: str) -> list[str]:
    """Unified diff lines between the expected table and this run's (empty when equal)."""
    return list(
        difflib.unified_diff(
            expected.splitlines(), text.splitlines(), "expected", "this run", n=0, lineterm=""
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scope.regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {EXPECTED.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)
    from scope import lock

    text = table_text(run())
    if args.write:
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        EXPECTED.write_text(text)
        print(f"wrote {EXPECTED.relative_to(REPO_ROOT)} ({text.count(chr(10)) - 1} answers); review its diff")
        return 0
    lines = diff(text, EXPECTED.read_text())
    drift = lock.mismatches(packages=NUMERIC_PACKAGES)
    if drift:
        print(f"not under the lock ({drift}): differences may be the environment's, not the code's")
    print("\n".join(lines) if lines else "every answer equals the expected table")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
