"""Benchmarks that print ratios measured in one run (never timed tests: these machines are noisy).

python -m scope.bench select   # reference vs fast exact SCOPE greedy
python -m scope.bench e2e      # tokens, FLOPs, latency of pruned LLaVA models (scope.efficiency)
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.benchmark import Timer

from .select import scope_greedy_fast, scope_greedy_reference

CASES = [(576, 64, 1), (576, 64, 8), (2880, 160, 1), (2880, 160, 8)]


def synthetic_inputs(n: int, batch: int, dim: int = 1024, kind: str = "clip-like", seed: int = 0):
    """Features and saliency shaped like LLaVA's vision layer -2 (CLS dropped).

    ``clip-like``: features drawn around 24 cluster centres (objects/background regions) with heavy-tailed
    saliency (softmax of scaled Gaussian logits), as CLIP's CLS attention is skewed (paper Fig. 1b).
    ``gaussian``: isotropic features and near-uniform saliency, the lazy greedy's worst case.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        feats = torch.randn(batch, n, dim, generator=gen)
        sal = torch.rand(batch, n, generator=gen).softmax(-1)
    elif kind == "clip-like":
        centres = torch.randn(batch, 24, dim, generator=gen)
        assign = torch.randint(0, 24, (batch, n), generator=gen)
        feats = centres.gather(1, assign[..., None].expand(-1, -1, dim)) + 0.7 * torch.randn(
            batch, n, dim, generator=gen
        )
        sal = (3.0 * torch.randn(batch, n, generator=gen)).softmax(-1)
    else:
        raise ValueError(f"kind must be 'clip-like' or 'gaussian', got {kind!r}")
    return feats, sal


def bench_select(kinds=("clip-like", "gaussian"), cases=CASES, min_run_time: float = 1.0, check: bool = True):
    """Time reference vs fast SCOPE greedy (ms per call, median); returns a list of row dicts."""
    rows = []
    for kind in kinds:
        for n, k, b in cases:
            feats, sal = synthetic_inputs(n, b, kind=kind)
            if check:
                same = torch.equal(scope_greedy_reference(feats, sal, k), scope_greedy_fast(feats, sal, k))
            else:
                same = None
            g = {"f": feats, "a": sal, "k": k, "ref": scope_greedy_reference, "fast": scope_greedy_fast}
            # interleave the two so that machine noise hits both alike
            ref_ms, fast_ms = [], []
            for _ in range(2):
                ref_ms.append(
                    Timer("ref(f, a, k)", globals=g).blocked_autorange(min_run_time=min_run_time).median
                )
                fast_ms.append(
                    Timer("fast(f, a, k)", globals=g).blocked_autorange(min_run_time=min_run_time).median
                )
            r, f = min(ref_ms) * 1e3, min(fast_ms) * 1e3
            rows.append(
                {
                    "data": kind,
                    "N": n,
                    "K": k,
                    "B": b,
                    "reference_ms": r,
                    "fast_ms": f,
                    "ratio": r / f,
                    "identical": same,
                }
            )
            print(
                f"{kind:>9} {n:5d} {k:4d} {b:2d} {r:12.1f} {f:10.1f} {r / f:7.2f}x {str(same):>9}", flush=True
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scope.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("select", help="reference vs fast exact SCOPE greedy")
    p.add_argument("--data", default="clip-like,gaussian", help="comma list of clip-like, gaussian")
    p.add_argument(
        "--min-run-time", type=float, default=1.0, help="seconds per timing (torch.utils.benchmark)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="only B=1 cases")
    sub.add_parser(
        "e2e", help="tokens, FLOPs and latency of pruned models (see scope.efficiency)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.what == "e2e":
        from . import efficiency

        return efficiency.main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not args.quick or c[2] == 1]
    print(f"SCOPE greedy, float32, d=1024, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{'data':>9} {'N':>5} {'K':>4} {'B':>2} {'reference ms':>12} {'fast ms':>10} {'ratio':>8} {'identical':>9}"
    )
    bench_select(tuple(args.data.split(",")), cases, args.min_run_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
