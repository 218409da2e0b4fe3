"""``python -m scope.smoke``: does pruning work on this machine's accelerator? A check of seconds to a minute.

Tiny LLaVA and LLaVA-NeXT models are built from configs (:mod:`scope.testing`: random weights, no download).
For every dtype (float16 and bfloat16 on CUDA, float32 on CPU), attention implementation (sdpa, and
flash_attention_2 when ``flash_attn`` is installed), batch size (1 and 4) and registered pruning method,
a patched ``model.generate`` (greedy, :data:`MAX_NEW_TOKENS` new tokens) runs on :func:`scope.testing.tiny_images`
and is checked:

* ``shape``: the caller's prompt comes back, then 1..MAX_NEW_TOKENS new tokens, one logits row per step;
* ``finite``: no NaN or inf in the logits of any step;
* ``tokens``: the LLM saw the visual tokens the method promises (``model._scope.last``): ``budget`` per
  image (LLaVA), ``(budget // crops) * crops`` (LLaVA-NeXT), the method's per-layer schedule (FastV, PDrop);
* ``batch`` (batch 4): each row equals the same question run alone (batch 1). float32: the same greedy
  tokens (a row may stop early at EOS) and first-step logits within :data:`TOLERANCE` (reduction-order
  noise only). float16 / bfloat16: the kept visual tokens are compared and the first-step logits must
  agree within :data:`TOLERANCE` (relative to the logits' scale); the greedy tokens must agree up to the
  first step whose top-2 logits are closer than the tolerance (a near tie that rounding may flip), and the
  line says where they part. Half-precision rounding may also flip a near tie in the selection itself: up
  to :data:`SELECTION_SLACK` of a row's kept tokens may then differ (the line says how many, and that row's
  logits are not compared, its LLM input being different); more is a failure.

One line per check: ``PASS|FAIL|SKIP <model> <dtype> <attn> b<batch> <method>: <detail>``, then a summary
with the total time; the exit status is 1 when any check fails. ``scripts/gpu_smoke.sh`` runs it on CUDA.

``python -m scope.smoke --gpu-hours`` prints instead the GPU-hour estimate of the README's runbook
(:func:`gpu_hours_table`): prefill FLOPs of the published configs (:mod:`scope.efficiency`) x benchmark
sizes, at an assumed throughput and as fitted to the paper's Table 5 wall times.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from scope.methods import COMPARED

__all__ = [
    "Case",
    "Check",
    "MAX_NEW_TOKENS",
    "TOLERANCE",
    "run_checks",
    "main",
    "QUESTIONS",
    "runbook",
    "gpu_hours_table",
]

MAX_NEW_TOKENS = 4
PROMPTS = ("what is in the image ?", "how many red circle and blue square ?", "yes", "describe it .")
# (width, height) per row: LLaVA-NeXT gets wide, square and tall images (3 or 5 crops of 16 tokens)
SIZES = {"tiny-llava": [(32, 32)] * 4, "tiny-llava-next": [(48, 30), (64, 64), (30, 48), (40, 40)]}
BUDGET = {"tiny-llava": 8, "tiny-llava-next": 10}  # of 16 tokens per image / crop
# batch-4 vs batch-1 logits: max |difference| / max |logit|. float32 differs by padding's reduction order
# only; float16 has 11 significant bits, bfloat16 8, and the errors of a few layers add up.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# half precision: a near tie in the selection may flip a few kept tokens; more than this share is a bug
SELECTION_SLACK = 0.25
DEFAULT_DTYPES = {"cuda": ("float16", "bfloat16"), "cpu": ("float32",)}
ATTENTION = ("sdpa", "flash_attention_2")
QUICK_METHODS = COMPARED  # the methods of the paper's efficiency comparison


@dataclass(frozen=True)
class Case:
    """One combination the smoke test runs."""

    model: str
    dtype: str
    attn: str
    batch: int | str
    method: str

    def label(self) -> str:
        """``<model> <dtype> <attn> b<batch> <method>``."""
        return f"{self.model} {self.dtype} {self.attn} b{self.batch} {self.method}"


@dataclass(frozen=True)
class Check:
    """One printed line: ``status`` is PASS, FAIL or SKIP."""

    status: str
    case: Case
    detail: str

    def line(self) -> str:
        """The printed line: ``<status> <case label>: <detail>``."""
        return f"{self.status} {self.case.label()}: {self.detail}"


@dataclass
class Run:
    """What one ``generate`` call gave: the inputs, the output and ``model._scope.last`` after it."""

    inputs: dict
    sequences: torch.Tensor
    logits: list[torch.Tensor]
    last: dict


# --------------------------------------------------------------------------------------------------------
# building and running
# --------------------------------------------------------------------------------------------------------


def build(name: str, dtype: str, attn: str, device: str):
    """A tiny model (seed 0) in ``dtype`` on ``device`` with attention ``attn``, and its processor."""
    from scope.testing import tiny_llava, tiny_llava_next

    make = tiny_llava_next if name == "tiny-llava-next" else tiny_llava
    model, processor = make(seed=0)
    model.to(device=device, dtype=getattr(torch, dtype))
    if attn != "sdpa":  # after the move: flash-attention checks the device and dtype it is asked on
        model.set_attn_implementation(attn)
    return model.eval(), processor


def model_inputs(model, processor, name: str, rows: Sequence[int]) -> dict:
    """Processor outputs for the questions and images of ``rows``, on the model's device and dtype."""
    from scope.testing import chat_prompt, tiny_images

    images = [tiny_images(1, size=SIZES[name][r], seed=r)[0] for r in rows]
    text = [chat_prompt(processor, PROMPTS[r]) for r in rows]
    inputs = dict(processor(images=images, text=text, return_tensors="pt", padding=True))
    param = next(model.parameters())
    out = {k: v.to(param.device) for k, v in inputs.items()}
    out["pixel_values"] = out["pixel_values"].to(param.dtype)
    return out


@torch.no_grad()
def generate(model, inputs: dict) -> Run:
    """Greedy ``generate`` with per-step logits; the patch's record of the call is copied."""
    out = model.generate(
        **inputs,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return Run(inputs, out.sequences, [s.float() for s in out.logits], dict(model._scope.last))


# --------------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------------


def check_shape(runs: Sequence[Run]) -> tuple[bool, str]:
    """Prompt returned unchanged, 1..MAX_NEW_TOKENS new tokens, one [B, vocab] logits row per step."""
    for run in runs:
        ids = run.inputs["input_ids"]
        b, length = ids.shape
        new = run.sequences.shape[1] - length
        if run.sequences.shape[0] != b or not 1 <= new <= MAX_NEW_TOKENS:
            return False, f"sequences {list(run.sequences.shape)} for a prompt of {list(ids.shape)}"
        if not torch.equal(run.sequences[:, :length], ids):
            return False, "the caller's prompt did not come back in front of the new tokens"
        if len(run.logits) != new or any(s.shape[0] != b for s in run.logits):
            return False, f"{len(run.logits)} logits steps for {new} new tokens"
    seq = runs[0].sequences.shape
    return (
        True,
        f"{len(runs)} run(s), sequences {list(seq)}, {seq[1] - runs[0].inputs['input_ids'].shape[1]} new",
    )


def check_finite(runs: Sequence[Run]) -> tuple[bool, str]:
    """No NaN or inf in any step's logits."""
    bad = sum(int((~torch.isfinite(s)).sum()) for run in runs for s in run.logits)
    steps = sum(len(run.logits) for run in runs)
    if bad:
        return False, f"{bad} NaN/inf logits over {steps} steps"
    scale = max(float(s.abs().max()) for run in runs for s in run.logits)
    return True, f"logits of {steps} steps finite (max |logit| {scale:.3g})"


def expected_tokens(model, name: str, method: str, budget: int, run: Run) -> list:
    """What ``model._scope.last`` must say the LLM saw: per image (pre-LLM) or per row and layer (in-LLM)."""
    from scope.efficiency import token_schedule
    from scope.methods import IN_LLM, get_method

    n_layers = model.config.text_config.num_hidden_layers
    if get_method(method).stage == IN_LLM:
        n_visual = (run.inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
        return [token_schedule(method, budget, n, n_layers) for n in n_visual]
    if name == "tiny-llava-next":
        from scope.patch.llava_next import crop_counts

        return [(budget // c) * c for c in crop_counts(model, run.inputs["image_sizes"])]
    return [budget] * run.inputs["input_ids"].shape[0]


def seen_tokens(run: Run) -> list:
    """What the patch recorded: visual tokens per image, or per row and layer for in-LLM methods."""
    if "visual_tokens_per_layer" in run.last:
        return run.last["visual_tokens_per_layer"].tolist()
    return list(run.last["tokens_per_image"])


def check_tokens(model, name: str, method: str, budget: int, runs: Sequence[Run]) -> tuple[bool, str]:
    """The visual tokens the LLM saw, by the patch's record, against what the method promises."""
    for run in runs:
        want, got = expected_tokens(model, name, method, budget, run), seen_tokens(run)
        if got != want:
            return False, f"LLM saw {got} visual tokens, expected {want}"
    got = seen_tokens(runs[-1])
    what = "per row and layer" if isinstance(got[0], list) else "per image"
    return (
        True,
        f"LLM saw {got if len(runs) == 1 else [seen_tokens(r)[0] for r in runs]} visual tokens {what}",
    )


def kept_sets(run: Run, row: int, length: int) -> list[set[int]]:
    """The tokens ``row`` kept: index sets per image / crop (pre-LLM), or kept slots of its last ``length``
    positions per drop (in-LLM; the batch is left padded, so a row's own positions are its last ones)."""
    if "kept_slots" in run.last:
        return [set(k[row, -length:].nonzero().flatten().tolist()) for k in run.last["kept_slots"]]
    idx = run.last["indices"][row]
    return [set(r.tolist()) for r in idx.reshape(-1, idx.shape[-1])]


def kept_difference(a: list[set[int]], b: list[set[int]]) -> tuple[int, int]:
    """(tokens kept in one record and not the other, tokens kept): 0 when the selections agree."""
    total = max(sum(map(len, a)), sum(map(len, b)), 1)
    if len(a) != len(b):
        return total, total
    return sum(max(len(x - y), len(y - x)) for x, y in zip(a, b)), total


def compare_row(batch: Run, alone: Run, row: int, dtype: str) -> tuple[bool, str, float]:
    """Row ``row`` of the batch against the same question run alone (the rules: the module docstring).

    Returns (ok, note, logits difference relative to the logits' scale; NaN when not compared)."""
    tol, exact = TOLERANCE[dtype], dtype == "float32"
    length = alone.inputs["input_ids"].shape[1]
    differ, total = kept_difference(kept_sets(batch, row, length), kept_sets(alone, 0, length))
    if differ and (exact or differ > max(1, SELECTION_SLACK * total)):
        return False, f"row {row}: {differ} of {total} kept tokens differ from batch 1", float("nan")
    if differ:  # a near tie in the half-precision selection flipped: the LLM inputs differ, do not compare
        return True, f"row {row}: {differ} of {total} kept tokens differ (selection near tie)", float("nan")
    scale = max(float(alone.logits[0].abs().max()), 1e-6)
    delta = float((batch.logits[0][row] - alone.logits[0][0]).abs().max()) / scale
    if delta > tol:
        return False, f"row {row}: first-step logits differ by {delta:.2g} of their scale (> {tol:g})", delta
    new = alone.sequences[0, length:]
    gen = batch.sequences[row, batch.inputs["input_ids"].shape[1] :][: new.numel()]  # a row may stop at EOS
    step = next((t for t in range(new.numel()) if gen[t] != new[t]), None)
    if step is None:
        return True, "", delta
    top = alone.logits[step][0].topk(2).values
    gap = float(top[0] - top[1]) / scale
    if exact or gap > tol:
        return False, f"row {row}: greedy tokens part at step {step} (top-2 gap {gap:.2g} of scale)", delta
    return True, f"row {row}: tokens part at step {step}, a near tie (top-2 gap {gap:.2g})", delta


def check_batch(batch: Run, alones: Sequence[Run], dtype: str) -> tuple[bool, str]:
    """Every row of the batch-4 run against its batch-1 run."""
    notes, deltas = [], []
    for row, alone in enumerate(alones):
        ok, note, delta = compare_row(batch, alone, row, dtype)
        if not ok:
            return False, note
        notes += [note] if note else []
        deltas += [delta] if delta == delta else []
    rule = "identical tokens" if dtype == "float32" else "same tokens up to a near tie"
    worst = f"max {max(deltas):.2g}" if deltas else "not compared"
    head = (
        f"{len(alones)} rows = batch 1 ({rule}; first-step logits {worst} <= {TOLERANCE[dtype]:g} of scale)"
    )
    return True, "; ".join([head, *notes])


# --------------------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------------------


def method_checks(model, processor, name: str, dtype: str, attn: str, method: str) -> list[Check]:
    """Batch 1 (each of the four questions alone) and batch 4 for one method: shape, finite, tokens, batch."""
    import scope

    budget = BUDGET[name]
    one, four = Case(name, dtype, attn, 1, method), Case(name, dtype, attn, 4, method)
    try:
        with scope.patch(model, method=method, budget=budget):
            alones = [generate(model, model_inputs(model, processor, name, [r])) for r in range(4)]
            batch = generate(model, model_inputs(model, processor, name, range(4)))
    except Exception as err:  # noqa: BLE001 -- a smoke test reports every failure and goes on
        msg = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return [Check("FAIL", one, msg), Check("FAIL", four, msg)]
    out = []
    for case, runs in ((one, alones), (four, [batch])):
        for what, (ok, detail) in (
            ("shape", check_shape(runs)),
            ("finite", check_finite(runs)),
            ("tokens", check_tokens(model, name, method, budget, runs)),
        ):
            out.append(Check("PASS" if ok else "FAIL", case, f"{what}: {detail}"))
    ok, detail = check_batch(batch, alones, dtype)
    out.append(Check("PASS" if ok else "FAIL", four, f"batch: {detail}"))
    return out


def grid(device: str, models, dtypes, attns, methods) -> Iterator[Check]:
    """Every check of the smoke test, in order (models are built once per dtype and attention)."""
    from scope.methods import IN_LLM, get_method

    have_fa2 = importlib.util.find_spec("flash_attn") is not None
    for name in models:
        for dtype in dtypes:
            for attn in attns:
                if attn == "flash_attention_2" and (not device.startswith("cuda") or not have_fa2):
                    why = "flash-attn not installed" if not have_fa2 else "flash-attention-2 needs CUDA"
                    yield Check("SKIP", Case(name, dtype, attn, "1,4", "*"), f"skipped: {why}")
                    continue
                try:
                    model, processor = build(name, dtype, attn, device)
                except Exception as err:  # noqa: BLE001
                    yield Check(
                        "FAIL", Case(name, dtype, attn, "1,4", "*"), f"build: {type(err).__name__}: {err}"
                    )
                    continue
                for method in methods:
                    if attn == "flash_attention_2" and get_method(method).stage == IN_LLM:
                        yield Check(
                            "SKIP", Case(name, dtype, attn, "1,4", method), "skipped: sdpa/eager only"
                        )
                        continue
                    yield from method_checks(model, processor, name, dtype, attn, method)


def run_checks(
    device: str = "cuda",
    models: Sequence[str] = ("tiny-llava", "tiny-llava-next"),
    dtypes: Sequence[str] | None = None,
    attns: Sequence[str] = ATTENTION,
    methods: Sequence[str] | None = None,
    echo: Callable[[str], None] | None = print,
) -> list[Check]:
    """Run the smoke grid, printing one line per check through ``echo``; returns the checks.

    ``dtypes`` default to float16 and bfloat16 on CUDA, float32 elsewhere; ``methods`` to every registered
    pre-LLM and in-LLM method (``scope.methods.names("pre_llm", "in_llm")``).
    """
    from scope.methods import IN_LLM, PRE_LLM, names

    dtypes = dtypes or DEFAULT_DTYPES["cuda" if device.startswith("cuda") else "cpu"]
    methods = methods or names(PRE_LLM, IN_LLM)
    checks = []
    for check in grid(device, models, dtypes, attns, methods):
        checks.append(check)
        if echo:
            echo(check.line())
    return checks


def summary(checks: Sequence[Check], seconds: float) -> str:
    """``N checks: P passed, F failed, S skipped in T s``."""
    count = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    return (
        f"{len(checks)} checks: {count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped "
        f"in {seconds:.1f} s"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's options (``python -m scope.smoke --help``)."""
    p = argparse.ArgumentParser(prog="python -m scope.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help=f"methods {', '.join(QUICK_METHODS)} only")
    p.add_argument(
        "--dtypes", default=None, help="comma list (default: float16,bfloat16 on CUDA, float32 on CPU)"
    )
    p.add_argument("--attn", default=",".join(ATTENTION), help="comma list of attention implementations")
    p.add_argument("--methods", default=None, help="comma list (default: every pre-LLM and in-LLM method)")
    p.add_argument("--models", default="tiny-llava,tiny-llava-next")
    p.add_argument("--gpu-hours", action="store_true", help="print the runbook's GPU-hour estimate and exit")
    return p.parse_args(argv)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the smoke grid (exit status 1 if any check fails), or ``--gpu-hours``."""
    args = parse_args(argv)
    if args.gpu_hours:
        print(gpu_hours_table())
        return 0
    from scope.load import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as err:
        print(f"FAIL setup: {err} (torch {torch.__version__})")
        return 1
    methods = _split(args.methods) or (list(QUICK_METHODS) if args.quick else None)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"scope.smoke on {args.device} ({where}), torch {torch.__version__}")
    start = time.perf_counter()
    checks = run_checks(args.device, _split(args.models), _split(args.dtypes), _split(args.attn), methods)
    print(summary(checks, time.perf_counter() - start))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


# --------------------------------------------------------------------------------------------------------
# the runbook's GPU-hour estimate
# --------------------------------------------------------------------------------------------------------

# Questions per benchmark: the whole split each scope.eval task evaluates (sources in the README's runbook)
QUESTIONS = {
    "gqa": 12578,  # testdev-balanced instructions
    "mmbench_en_dev": 4329,  # MMBench en dev, circular copies included (one generate each)
    "mme": 2374,  # MME test
    "pope": 9000,  # POPE test: 3 x 3,000 (adversarial, popular, random)
    "scienceqa_img": 2017,  # ScienceQA-IMG test
    "textvqa_val": 5000,  # TextVQA validation
    "seedbench": 14233,  # SEED-Bench image part (its 9 image dimensions)
    "mmmu_val": 900,  # MMMU validation
}
T1 = ("gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "textvqa_val", "seedbench")
T2 = ("gqa", "mmbench_en_dev", "mme", "scienceqa_img", "textvqa_val", "mmmu_val")


def notebook_methods(stem: str) -> tuple[str, ...]:
    """The ``methods`` parameter of ``notebooks/<stem>.ipynb``: the runbook runs what the notebook reads."""
    import ast
    import json

    from scope.paths import NOTEBOOKS_DIR

    cells = json.loads((NOTEBOOKS_DIR / f"{stem}.ipynb").read_text())["cells"]
    source = next(
        "".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])
    )
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "methods":
            return tuple(ast.literal_eval(node.value))
    raise ValueError(f"notebook {stem} has no methods parameter")


_FIG6 = ("alpha0.25", "alpha0.5", "alpha2", "alpha4", "add")  # notebook 07's SCOPE variants at 64


@dataclass(frozen=True)
class Job:
    """The runs of one paper element: (run name, method, budget) on ``config`` over ``tasks``."""

    element: str
    config: str
    tasks: tuple[str, ...]
    runs: tuple[tuple[str, str, int | None], ...]


def _runs(methods: Sequence[str], budgets: Sequence[int], unpruned: bool = True) -> tuple:
    head = (("none", "none", None),) if unpruned else ()
    return head + tuple((f"{m}-{b}", m, b) for m in methods for b in budgets)


def runbook() -> tuple[Job, ...]:
    """The runs of each paper element (the README's runbook), methods as notebooks 03, 04, 05 and 07 use them."""
    return (
        Job("Table 1", "llava-1.5-7b", T1, _runs(notebook_methods("03_llava15_results"), (192, 128, 64))),
        Job(
            "Table 2",
            "llava-v1.6-vicuna-7b",
            T2,
            _runs(notebook_methods("04_llava_next_results"), (640, 320, 160)),
        ),
        Job(
            "Fig. 4 (32/16/8)",
            "llava-1.5-7b",
            T1,
            _runs(notebook_methods("05_extreme_pruning"), (32, 16, 8), unpruned=False),
        ),
        Job(
            "Table 4 + Fig. 6",
            "llava-1.5-7b",
            T1,
            (("coverage-64", "coverage", 64),) + tuple((f"scope-64-{v}", "scope", 64) for v in _FIG6),
        ),
        Job(
            "Table 5",
            "llava-v1.6-vicuna-7b",
            ("pope",),
            (("none", "none", None), ("scope-160", "scope", 160), ("pdrop-160", "pdrop", 160)),
        ),
    )


A100_FP16 = 312e12  # dense FLOP/s (tensor cores, fp16 / bf16)
PAPER_TABLE5 = {"none": 601.9, "scope": 188.8, "pdrop": 184.0}  # s, LLaVA-NeXT 7B, POPE (data/paper)


def _flops(config: str, method: str, budget: int | None) -> float:
    """Prefill FLOPs of one question (scope.efficiency: one image, a 64-token prompt)."""
    from scope.efficiency import prefill_flops

    return prefill_flops(config, method, budget)["total_gflops"] * 1e9


def table5_fit(gpus: int = 4) -> tuple[float, float]:
    """(FLOP/s per GPU, seconds per question per GPU) that reproduce the paper's Table 5 wall times.

    Two unknowns, two runs: the unpruned and the SCOPE-160 POPE runs of LLaVA-NeXT 7B, taken as wall times
    of ``gpus`` GPUs (data/paper/README.md: "most likely ... on 4 GPUs"); time = FLOPs / rate + overhead.
    """
    n = QUESTIONS["pope"]
    full, pruned = _flops("llava-v1.6-vicuna-7b", "none", None), _flops("llava-v1.6-vicuna-7b", "scope", 160)
    rate = (full - pruned) * n / ((PAPER_TABLE5["none"] - PAPER_TABLE5["scope"]) * gpus)
    overhead = (PAPER_TABLE5["scope"] * gpus - pruned * n / rate) / n
    return rate, overhead


def gpu_hours(utilisation: float = 0.4, gpus: int = 4):
    """One row per runbook element: runs, questions per run, prefill PFLOP and GPU-hours two ways.

    ``gpu_h_flops``: the FLOPs at ``utilisation`` of an A100's dense fp16 rate; ``gpu_h_fit``: FLOPs at the
    rate fitted to the paper's Table 5 plus its fitted per-question overhead (:func:`table5_fit`).
    """
    import pandas as pd

    rate, overhead = table5_fit(gpus)
    rows = []
    for job in runbook():
        n = sum(QUESTIONS[t] for t in job.tasks)
        flops = sum(_flops(job.config, m, b) for _, m, b in job.runs) * n
        rows.append({
            "element": job.element, "config": job.config, "runs": len(job.runs), "questions": n,
            "pflop": flops / 1e15,
            "gpu_h_flops": flops / (utilisation * A100_FP16) / 3600,
            "gpu_h_fit": (flops / rate + overhead * n * len(job.runs)) / 3600,
        })  # fmt: skip
    return pd.DataFrame(rows)


def gpu_hours_table(utilisation: float = 0.4, gpus: int = 4) -> str:
    """The runbook's GPU-hour table (Markdown), its total and the Table 5 cross-check, as printed text."""
    df = gpu_hours(utilisation, gpus)
    rate, overhead = table5_fit(gpus)
    lines = [
        "| element | model config | runs | questions per run | prefill PFLOP | GPU-h at "
        f"{utilisation:.0%} of A100 | GPU-h, Table 5 fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.element} | {r.config} | {r.runs} | {r.questions:,} | {r.pflop:,.0f} | {r.gpu_h_flops:.1f} "
            f"| {r.gpu_h_fit:.1f} |"
        )
    lines.append(
        f"| total | | {df.runs.sum()} | | {df.pflop.sum():,.0f} | {df.gpu_h_flops.sum():.1f} "
        f"| {df.gpu_h_fit.sum():.1f} |"
    )
    n, cfg = QUESTIONS["pope"], "llava-v1.6-vicuna-7b"
    check = []
    for method, budget in (("none", None), ("scope", 160), ("pdrop", 160)):
        f = _flops(cfg, method, budget) * n
        at_util = f / (utilisation * A100_FP16) / gpus
        check.append(
            f"{method}{'' if budget is None else f'-{budget}'}: {at_util:.0f} s at {utilisation:.0%}, "
            f"{(f / rate + overhead * n) / gpus:.0f} s fitted, paper {PAPER_TABLE5[method]} s"
        )
    lines += [
        "",
        f"Table 5 fit ({gpus} GPUs assumed): {rate / 1e12:.0f} TFLOP/s per GPU "
        f"({rate / A100_FP16:.0%} of an A100's dense fp16) + {overhead * 1e3:.0f} ms per question.",
        f"POPE on LLaVA-NeXT 7B, wall time on {gpus} GPUs: " + "; ".join(check) + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
