"""``python -m scope.eval``: evaluate a (pruned) LLaVA model on SynthBench and the paper's benchmarks.

Examples::

    python -m scope.eval                                           # MiniLLaVA, SCOPE at 64, SynthBench
    python -m scope.eval --method scope,random --budget 192,64 --tasks synthbench --out results/sweep
    accelerate launch -m scope.eval --model llava-hf/llava-1.5-7b-hf --method scope --budget 64 \\
        --tasks gqa,mmbench_en_dev,mme,pope,scienceqa_img,textvqa_val,seedbench --batch-size 16 \\
        --dtype float16 --out results/llava15-scope-64
    python -m scope.eval --rescore results/llava15-scope-64       # re-aggregate from the JSONL logs
    python -m scope.eval --model llava-hf/llava-1.5-7b-hf --tasks textvqa,seedbench --show-prompts --limit 2
    python -m scope.eval --tasks pope,seedbench --fixtures --method scope --budget 8   # offline fixture data
    python -m scope.eval --model LanguageBind/Video-LLaVA-7B-hf --method scope --budget 136 \\
        --tasks msvd_qa,msrvtt_qa,tgif_qa,activitynetqa --datasets-dir eval/GPT_Zero_Shot_QA   # Table 3
    python -m scope.eval --model Qwen/Qwen2-VL-7B-Instruct --method scope,divprune --budget 0.25,0.1 \\
        --tasks gqa,mmbench_en_dev,mme,pope --dtype bfloat16 --out results/qwen2vl   # Table 8 (shares)

``--protocol paper`` (the default for real checkpoints) reproduces the authors' preprocessing, conversation
and task settings, ``--protocol hf`` keeps the checkpoint's own processor and chat template
(:mod:`scope.protocol`); the embedded models default to ``hf``. ``--show-prompts`` prints what the model
would receive for the first ``--limit`` questions (default 3) of each task, from the processor alone (no
weights are loaded).

With one method and one budget ``--out`` is the run directory; with several, ``--out`` holds one run
directory per combination (``<method>-<budget>``, plus ``none`` for the unpruned model). On Qwen2-VL /
Qwen2.5-VL a budget may be a share of each image's tokens (``0.25``), and ``--min-pixels`` /
``--max-pixels`` bound the image areas the processor resizes to (recorded in config.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TINY_VIDEO_LLAVA = "tiny-video-llava"  # --model name of scope.testing.tiny_video_llava (random weights)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scope.eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help=f"hub id or local path (default: the embedded MiniLLaVA); {TINY_VIDEO_LLAVA!r}: a tiny "
        "random-weight Video-LLaVA for offline runs of the video tasks (mechanics only, not results)",
    )
    p.add_argument("--method", default="scope", help="pruning method(s), comma-separated; 'none' = unpruned")
    p.add_argument(
        "--budget",
        default="64",
        help="visual-token budget(s), comma-separated: tokens per image, or on Qwen-VL a share such as 0.25",
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. alpha=0.5"
    )
    p.add_argument("--tasks", default="synthbench", help="comma-separated task names")
    p.add_argument(
        "--judge",
        default="match",
        choices=["match", "openai", "openai_authors"],
        help="video QA scoring: offline word match (default; not the paper's GPT judge) or the authors' "
        "GPT-3.5 judge (needs openai and OPENAI_API_KEY) at temperature 0 (openai) or, as the authors "
        "call it, at the API's default temperature (openai_authors)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N questions per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="e.g. float16, bfloat16 (default: the checkpoint's)")
    p.add_argument(
        "--protocol",
        default=None,
        choices=["paper", "hf"],
        help="inputs as the paper's runs or as the checkpoint's processor (default: paper for real "
        "checkpoints, hf for the embedded ones)",
    )
    p.add_argument("--min-pixels", type=int, default=None, help="Qwen-VL: smallest image area after resizing")
    p.add_argument("--max-pixels", type=int, default=None, help="Qwen-VL: largest image area after resizing")
    p.add_argument(
        "--show-prompts", action="store_true", help="print the model's inputs for the first --limit questions"
    )
    p.add_argument("--fixtures", action="store_true", help="use the small offline fixture datasets")
    p.add_argument(
        "--datasets-dir",
        default=None,
        help="folder of local benchmark copies, tried before the hub (default: $SCOPE_DATASETS_DIR)",
    )
    p.add_argument("--out", default=None, help="run directory (default: results/<model>-<method>-<budget>)")
    p.add_argument("--no-unpruned", action="store_true", help="in a sweep, skip the unpruned run")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--rescore", metavar="RUN_DIR", default=None, help="only recompute results.json of RUN_DIR"
    )
    return p.parse_args(argv)


def parse_options(pairs: list[str]) -> dict:
    """``--option KEY=VALUE`` pairs as a dict, each value read as JSON where it parses (else a string)."""
    from scope.eval.rundir import json_value

    options = {}
    for kv in pairs:
        if "=" not in kv:
            raise SystemExit(f"--option {kv!r} must look like KEY=VALUE")
        k, v = kv.split("=", 1)
        options[k.strip()] = json_value(v.strip())
    return options


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from scope.eval.rundir import rescore, summary_table
    from scope.eval.runner import evaluate, sweep

    if args.rescore:
        print(summary_table(rescore(args.rescore)))
        return 0

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise SystemExit(f"--method={args.method!r} names no method; give one or more, comma-separated")
    budgets = parse_budgets(args.budget)
    if not budgets:
        raise SystemExit(f"--budget={args.budget!r} names no budget; give one or more, comma-separated")
    options = parse_options(args.option)
    datasets = fixture_datasets(args.tasks) if args.fixtures else {}
    if args.show_prompts:
        print(show_prompts(args, datasets))
        return 0

    from scope.eval.runner import partial_state

    state = partial_state()  # several CPU processes get the gloo group before anything else asks
    from scope.load import load

    try:  # each process on its own device (accelerate's), in the dtype asked for
        if args.model == TINY_VIDEO_LLAVA:
            model, processor = tiny_video_llava_hf(args.seed)
        else:
            model, processor = load(args.model, device=str(state.device), dtype=args.dtype)
    except ValueError as err:
        raise SystemExit(str(err)) from None

    common = dict(
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        options=options,
        model_id=args.model,
        protocol=args.protocol,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        datasets=datasets,
        data_dir=args.datasets_dir,
        judge=args.judge,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    name = Path(args.model).name if args.model else "minillava"
    if len(methods) == 1 and len(budgets) == 1:
        out = args.out or f"results/{name}-{methods[0]}-{budgets[0]}"
        res = evaluate(
            model, processor, args.tasks, out_dir=out, method=methods[0], budget=budgets[0], **common
        )
        if state.is_main_process:
            print(summary_table(res))
    else:
        out = args.out or f"results/{name}-sweep"
        res = sweep(
            model,
            processor,
            args.tasks,
            out_root=out,
            methods=methods,
            budgets=budgets,
            include_unpruned=not args.no_unpruned,
            **common,
        )
        if state.is_main_process:
            from scope.report import paper_layout, to_markdown

            print(to_markdown(paper_layout([Path(out) / k for k in res], ci=False)))
    return 0


def tiny_video_llava_hf(seed: int = 0):
    """(model, processor) of :func:`scope.testing.tiny_video_llava`, run under the ``hf`` protocol (its
    processor is the one it was built with; there is no authors' pipeline to reproduce on random weights)."""
    from scope.testing import tiny_video_llava

    model, processor = tiny_video_llava(seed=seed)
    processor.scope_protocol = "hf"
    return model, processor


def parse_budgets(text: str) -> list[int | float]:
    """``--budget``: comma-separated token counts (``64``) or shares in (0, 1] (``0.25``, Qwen-VL)."""
    out: list[int | float] = []
    for b in (b.strip() for b in text.split(",")):
        if not b:
            continue
        try:
            out.append(int(b))
        except ValueError:
            try:
                share = float(b)
            except ValueError:
                share = None
            if share is None or not 0 < share <= 1:
                raise SystemExit(
                    f"--budget={text!r} must be token counts (64) or shares in (0, 1] (0.25), separated by "
                    "commas"
                ) from None
            out.append(share)
    return out


def fixture_datasets(tasks: str) -> dict:
    """{task: its fixture dataset} for ``--fixtures`` (SynthBench renders itself offline and has none)."""
    from scope.eval.fixtures import FIXTURES, fixture
    from scope.eval.tasks import parse_tasks

    try:
        names = [t.name for t in parse_tasks(tasks)]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return {n: fixture(n) for n in names if n in FIXTURES}


def show_prompts(args: argparse.Namespace, datasets: dict) -> str:
    """What ``--show-prompts`` prints: per task, the first ``--limit`` (default 3) questions' model inputs
    under the run's protocol (:func:`scope.protocol.model_inputs`), from the processor alone."""
    from scope.eval.tasks import parse_tasks
    from scope.load import load_processor
    from scope.protocol import limited_pixels, resolve_protocol

    try:
        processor = tiny_video_llava_hf()[1] if args.model == TINY_VIDEO_LLAVA else load_processor(args.model)
        protocol = resolve_protocol(args.model, args.protocol or getattr(processor, "scope_protocol", None))
        tasks = parse_tasks(args.tasks)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        raise SystemExit(str(err)) from None
    limit = args.limit or 3
    out = [f"model={args.model or 'embedded MiniLLaVA'} protocol={protocol.name} ({protocol.summary})"]
    try:
        with limited_pixels(processor, args.min_pixels, args.max_pixels):
            out += _task_inputs(args, processor, protocol, tasks, datasets, limit)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return "\n".join(out)


def _task_inputs(args, processor, protocol, tasks, datasets: dict, limit: int) -> list[str]:
    """:func:`show_prompts`' lines for every task."""
    from scope.eval.tasks import prepare
    from scope.eval.video_tasks import video_inputs
    from scope.protocol import format_inputs, model_inputs

    out = []
    for base in tasks:
        task = base.under(protocol)
        if task.name in datasets:
            docs = prepare(task, datasets[task.name], limit, args.datasets_dir)
        else:
            docs = task.load(limit=limit, seed=args.seed, data_dir=args.datasets_dir)
        for i in range(min(limit, len(docs))):
            if task.video:  # frames and the video prompt (scope.eval.video_tasks)
                out.append(video_inputs(processor, task, docs[i], protocol, f"[{task.name} #{i}]"))
                out[-1] += f"\n  max new tokens: {args.max_new_tokens or task.max_new_tokens}"
                continue
            inputs = model_inputs(processor, task.prompt(docs[i]), task.images(docs[i]), protocol)
            out.append(format_inputs(f"[{task.name} #{i}] qid={task.qid(docs[i])}", inputs))
            out[-1] += f"\n  max new tokens: {args.max_new_tokens or task.max_new_tokens}"
    return out


if __name__ == "__main__":
    sys.exit(main())
