"""Evaluation: SynthBench and the paper's benchmarks, scored as lmms-eval scores them, with per-sample logs.

Python::

    import scope
    from scope.eval import evaluate, sweep
    model, processor = scope.load()                          # embedded MiniLLaVA
    evaluate(model, processor, "synthbench,pope", method="scope", budget=64, out_dir="results/scope-64")
    sweep(model, processor, "synthbench", methods=["scope", "random"], budgets=[192, 64], out_root="results/sweep")

CLI: ``python -m scope.eval --method scope --budget 64 --tasks synthbench --out results/scope-64``.
Video QA (Video-LLaVA, Table 3): :mod:`scope.eval.video_tasks` (``--tasks msvd_qa,... --judge match|openai``).
Tables from run directories: :mod:`scope.report`.
"""

from scope.eval.generate import build_prompt, generate_answers
from scope.eval.rundir import merge_task, read_jsonl, rescore, summary_table
from scope.eval.runner import evaluate, sweep
from scope.eval.tasks import ALIASES, TASKS, Task, get_task, parse_tasks

__all__ = [
    "ALIASES",
    "TASKS",
    "Task",
    "build_prompt",
    "evaluate",
    "generate_answers",
    "get_task",
    "merge_task",
    "parse_tasks",
    "read_jsonl",
    "rescore",
    "summary_table",
    "sweep",
]
