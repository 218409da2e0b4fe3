"""Benchmarks that print ratios measured in one run (never timed tests: these machines are noisy).

python -m scope.bench select   # reference vs fast exact SCOPE greedy
python -m scope.bench e2e      # tokens, FLOPs, latency of pruned LLaVA models (scope.efficiency, scope.latency)
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.benchmark import Timer

from .efficiency import DEFAULT_METHODS, PAPER_CONFIGS, PROMPT_TOKENS, flops_table, load_config, visual_layout
from .latency import default_model, latency_table, selection_time, synthetic_inputs
from .methods import IN_LLM, PRE_LLM, get_method, names
from .select import scope_greedy_fast, scope_greedy_reference

CASES = [(576, 64, 1), (576, 64, 8), (2880, 160, 1), (2880, 160, 8)]


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


_FLOP_COLUMNS = [
    "model", "method", "budget", "visual_in", "visual_avg", "vision_gflops", "select_gflops", "saliency_gflops",
    "llm_gflops", "total_gflops", "flops_ratio", "llm_ratio", "token_ratio", "select_share", "kv_cache_mb",
    "select_ms_cpu",
]  # fmt: skip
_LATENCY_COLUMNS = [
    "method", "budget", "visual_in", "visual_avg", "prefill_ms", "ttft_ms", "decode_tok_s", "select_ms",
    "peak_mem_mb", "speedup", "token_ratio", "flops_ratio", "select_share",
]  # fmt: skip


def _selection_ms(row, configs: dict) -> float:
    """CPU time of a FLOP-table row's selection at the real dims (NaN for methods without one)."""
    if get_method(row.method).stage != PRE_LLM:
        return float("nan")
    config = configs[row.model]
    crops, n = visual_layout(config)
    return _timed_selection(row.method, int(row.budget), crops, n, config.vision_config.hidden_size)


@functools.lru_cache(maxsize=256)
def _timed_selection(method: str, budget: int, crops: int, n: int, d: int) -> float:
    return selection_time(method, budget, crops, n, d)


def _print(df: pd.DataFrame, columns: list[str]) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 500):
        print(df[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))


def _e2e_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scope.bench e2e", description=e2e.__doc__)
    add = parser.add_argument
    add("--configs", nargs="+", default=list(PAPER_CONFIGS), help="names in data/configs or folders")
    add("--methods", nargs="+", default=list(DEFAULT_METHODS))
    add("--budgets", nargs="+", type=int, default=None, help="default: the paper's per family")
    add("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    add("--model", default=None, help="model folder for the measured table (default: embedded)")
    add("--latency-budgets", nargs="+", type=int, default=None, help="default: paper ratios x N")
    add("--min-run-time", type=float, default=0.2, help="seconds per timed measurement")
    add("--decode-tokens", type=int, default=16)
    add(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the measured table (default 1: on a shared CPU, more threads spin against other "
        "processes and scatter the timings)",
    )
    add("--skip-flops", action="store_true")
    add("--skip-latency", action="store_true")
    add("--csv", default=None, help="write CSV: PATH gets the FLOP table, PATH with -latency the other")
    return parser


def e2e(argv: Sequence[str] | None = None) -> int:
    """``python -m scope.bench e2e``: the FLOP table of the paper's models and the measured table."""
    args = _e2e_parser().parse_args(argv)
    known = names(PRE_LLM, IN_LLM)
    for m in args.methods:
        if m not in known:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {sorted(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if not args.skip_flops:
        _e2e_flops(args)
    if not args.skip_latency:
        _e2e_latency(args)
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return 0


def _e2e_flops(args) -> None:
    flops = flops_table(args.configs, args.budgets, args.methods, args.prompt_tokens, progress=True)
    configs = {Path(str(c)).name: load_config(c) for c in args.configs}
    flops["select_ms_cpu"] = [_selection_ms(r, configs) for r in flops.itertuples()]
    print(
        f"\n# Prefill FLOPs counted on the meta device (FlopCounterMode): 1 image + {args.prompt_tokens} "
        "text tokens; LLaVA-NeXT N = 5 x 576 = 2880 split evenly over crops; select = scope.prune on "
        "random tensors of the real dims + elementwise closed form (dense greedy: an upper bound of the "
        "lazy one); select_share = (select + saliency) / total; kv_cache_mb in fp16; select_ms_cpu = "
        "scope.prune per image on this CPU at the real dims."
    )
    _print(flops, _FLOP_COLUMNS)
    if args.csv:
        flops.to_csv(args.csv, index=False)


def _e2e_latency(args) -> None:
    if args.model:
        from .load import load

        model, processor = load(args.model)
        label = str(args.model)
    else:
        model, processor, label = default_model()
    lat = latency_table(
        model,
        processor,
        args.latency_budgets,
        args.methods,
        args.min_run_time,
        args.decode_tokens,
        label=label,
        progress=True,
    )
    device = next(model.parameters()).device
    print(
        f"\n# Measured on {lat.model.iloc[0]}, {device.type}, {torch.get_num_threads()} threads, batch 1, "
        f"fastest block of torch.utils.benchmark (median of CUDA events on GPU); decode = {args.decode_tokens} "
        "tokens; select_share = scope.prune time on this image's features / pruned prefill."
    )
    _print(lat, _LATENCY_COLUMNS)
    if args.csv:
        path = Path(args.csv)
        lat.to_csv(path.with_name(path.stem + "-latency" + path.suffix), index=False)


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
        return e2e(rest)
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
