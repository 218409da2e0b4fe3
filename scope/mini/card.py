"""Model cards for the shipped MiniLLaVA checkpoints, written from the measured results of a training run.

What a card says the checkpoint scores is read from the run's ``results.json`` and ``training_log.csv``; the recipe is
stated from the training arguments (``mini_recipe``, ``next_recipe``), and the hand-written history of how
the recipe came about is kept in ``TRAINING_NOTES.md`` beside the checkpoint (its "Training notes").
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scope.mini.synthbench import DETAIL_FAMILIES, FAMILIES
from scope.mini.tower import LOCAL_OFFSETS

NOTES_FILE = "TRAINING_NOTES.md"  # hand-written training history beside a checkpoint, kept in its card

DISCLAIMER = (
    "**Results obtained with this model illustrate the SCOPE method on a toy model and a synthetic benchmark; "
    "they do not reproduce, and must not be compared with, the numbers of the SCOPE paper** (LLaVA-1.5 7B / "
    "LLaVA-NeXT 7B on GQA, MMBench, MME, POPE, ...)."
)


def _markdown_table(cols: list[tuple[str, dict]], keys: list[str]) -> str:
    """Rows ``keys`` (a ``family/subset`` key is indented under its family) x columns ``(header, accuracies)``."""
    rows = ["| family | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key in keys:
        cells = [f"{100 * col[key]:.1f}%" if key in col else "-" for _, col in cols]
        label = key if "/" not in key else f"&nbsp;&nbsp;{key.split('/')[1]} text"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _table(results: dict) -> str:
    """Accuracy per family: all tokens, random 64 tokens (when measured), MiniLLaVA (for the NeXT card)."""
    cols = [("all tokens", results["full"])]
    if results.get("random64"):
        cols.append(("random 64 tokens", results["random64"]))
    if results.get("minillava_full"):
        cols.append(("MiniLLaVA, all tokens", results["minillava_full"]))
    full = results["full"]
    subsets = [k for k in full if "/" in k]  # e.g. reading/small: rows under their family
    keys = [
        k for fam in (*FAMILIES, "overall") for k in [fam, *(s for s in subsets if s.startswith(fam + "/"))]
    ]
    return _markdown_table(cols, [k for k in keys if k in full])


TARGETS = {"overall": 0.9, "family": 0.8, "random64_drop": 0.10}


def mini_shortfalls(results: dict) -> list[str]:
    """The targets of the embedded MiniLLaVA that ``results`` miss (empty when all are met).

    Targets: >= 90% overall and >= 80% in every family with all tokens, and random pruning to 64 tokens
    costing >= 10 points overall (so that the benchmark is sensitive to pruning).
    """
    full, r64 = results["full"], results.get("random64") or {}
    missed = []
    if full["overall"] < TARGETS["overall"]:
        missed.append(f"overall {100 * full['overall']:.1f}% < 90%")
    low = [f"{f} {100 * v:.1f}%" for f, v in full.items() if f in FAMILIES and v < TARGETS["family"]]
    if low:
        missed.append("families below 80%: " + ", ".join(low))
    if r64 and full["overall"] - r64["overall"] < TARGETS["random64_drop"]:
        missed.append("random-64 costs < 10 points")
    return missed


def target_status(results: dict) -> str:
    """``"trained"`` when the model's accuracy targets are met, else ``"below target: "`` + the missed ones.

    MiniLLaVA: ``mini_shortfalls``. MiniLLaVA-NeXT (``minillava_full`` in ``results``): what higher resolution
    buys, i.e. reading on the test split above MiniLLaVA's and, with ``detail`` / ``minillava_detail``, every
    family of the fine-detail split above MiniLLaVA's (its card lists MiniLLaVA's targets it misses apart).
    """
    base = results.get("minillava_full")
    if not base:
        missed = mini_shortfalls(results)
        return "trained" if not missed else "below target: " + "; ".join(missed)
    missed = []
    if results["full"]["reading"] <= base["reading"]:
        missed.append("reading not above MiniLLaVA")
    detail, base_detail = results.get("detail") or {}, results.get("minillava_detail") or {}
    worse = [f for f in DETAIL_FAMILIES if f in detail and f in base_detail and detail[f] <= base_detail[f]]
    if worse:
        missed.append("detail split not above MiniLLaVA: " + ", ".join(worse))
    return "trained" if not missed else "below target: " + "; ".join(missed)


def _banner(results: dict) -> str:
    """The card's status line: missed targets, or for LLaVA-NeXT the MiniLLaVA targets it does not reach."""
    status = results.get("status", "trained")
    if status != "trained":
        return (
            f"> **Status: {status}.** Figures made with this checkpoint show a model below its accuracy targets "
            "(MiniLLaVA: >= 90% overall, >= 80% per family; MiniLLaVA-NeXT: above MiniLLaVA on fine detail).\n\n"
        )
    if not results.get("minillava_full"):
        return ""
    detail, base = results.get("detail") or {}, results.get("minillava_detail") or {}
    gain = (
        f" (detail split {100 * detail['overall']:.1f}% vs {100 * base['overall']:.1f}%)"
        if "overall" in detail and "overall" in base
        else ""
    )
    short = mini_shortfalls(results)
    rest = f" It does not reach MiniLLaVA's own targets: {'; '.join(short)}." if short else ""
    return (
        f"> **Status: meets its target**: it reads digits and resolves small shapes better than MiniLLaVA{gain}, "
        f"which is what its grid crops are for.{rest}\n\n"
    )


def _reused(results: dict) -> str:
    """A line saying which stage-1 outputs the run loaded from a cache, and the from-scratch time this implies.

    ``results["stage1_reused"]`` maps ``"tower"`` / ``"features"`` to ``(source, minutes)``: Markdown naming
    the cache, and the minutes it took to compute (``None`` when the cache was saved without them).
    """
    r = results.get("stage1_reused")
    if not r:
        return ""
    what = {"tower": "the vision tower", "features": "the layer -2 features of the training pool"}
    parts, extra, unknown = [], 0.0, False
    for key, (path, minutes) in r.items():
        took = "time to compute not recorded" if minutes is None else f"{minutes:.1f} min to compute"
        parts.append(f"{what[key]} ({took}) from {path}")
        extra += minutes or 0.0
        unknown |= minutes is None
    total = extra + results.get("train_minutes", 0.0)
    tail = (
        "so the time above leaves out stage-1 work of unrecorded length"
        if unknown
        else f"so training it from scratch takes about {total:.0f} min"
    )
    return "\n  This run loaded stage-1 outputs from caches: " + " and ".join(parts) + f"; {tail}."


def _detail(results: dict) -> str:
    """The card's fine-detail section: accuracy on the "detail" split (and MiniLLaVA's, on the NeXT card)."""
    detail = results.get("detail")
    if not detail:
        return ""
    cols = [("all tokens", detail)]
    if results.get("minillava_detail"):
        cols.append(("MiniLLaVA, all tokens", results["minillava_detail"]))
    return (
        '\n## Fine detail (`load_synthbench("detail")`, 240 questions)\n'
        "Digits (reading) and small shapes (attribute, counting) drawn at half size: a patch or less at 192 px, "
        "the usual size in LLaVA-NeXT's full-resolution crops. No training scene holds them.\n\n"
        + _markdown_table(cols, [*DETAIL_FAMILIES, "overall"])
        + "\n"
    )


def _reevaluated(results: dict) -> str:
    """The card's line saying the test accuracy was re-measured after the run (``--evaluate-only``)."""
    if not results.get("reevaluated"):
        return ""
    return (
        "- The accuracy above was re-measured on the current test split by `python -m scope.mini.train "
        "--evaluate-only`\n  (same weights as the training run; the run's own evaluation is the last row of "
        "`training_log.csv`).\n"
    )


def _cls_share(results: dict) -> str:
    """The card's CLS-attention line, when the run measured it (the NeXT stage reuses MiniLLaVA's tower)."""
    if "cls_top10_share" not in results:
        return ""
    return (
        "- Share of the layer -2 CLS attention (summed over heads, over the patches) held by the top 10% of "
        f"tokens:\n  **{100 * results['cls_top10_share']:.1f}%** (mean over {results.get('cls_images', 0)} "
        "test images; a uniform attention would give 10%).\n"
    )


def mini_recipe(args, flags: str = "") -> str:
    """The MiniLLaVA recipe as the model card states it, from the training arguments; ``flags``: the
    command-line flags that set ``args`` apart from ``make model``'s defaults (the card's rebuild command)."""
    return (
        f"{_tower_recipe(args)}\n{_lm_recipe(args)}\n"
        f"Seed {args.seed}; `python -m scope.mini.train --all{flags}` rebuilds it."
    )


def _tower_recipe(args) -> str:
    """Stage 1 of ``mini_recipe``."""
    return (
        f"1. Vision tower: first {args.tower_warmup} warm-up steps on full images (batch "
        f"{max(4, args.tower_batch // 2)}) with only the per-patch shape and digit losses, then "
        f"{args.tower_steps} AdamW steps (lr {args.tower_lr}, cosine), batch {args.tower_batch} "
        f"scenes, on {args.tower_window}x{args.tower_window}-patch windows (with their true position embeddings; "
        f"the last 15% of steps on full images, batch / 4); {100 * args.tower_zoom:.0f}% of the images are "
        "full-resolution 192 px crops of the 384 px render (the scale LLaVA-NeXT's grid crops show). Loss on the "
        "layer -2 CLS token: presence of every colour/shape combination (BCE) + number of each shape and colour "
        "(CE); loss on every layer -2 patch token: colour, shape, size, digit of the object under it and "
        "object-centre class (CE), and the grid row/column of the object's centre as ordinal targets (24 "
        "thresholds, BCE); each a mean over all patches + a mean over object patches. The heads are discarded; "
        "the last tower layer is never read by LLaVA and stays at its initialisation. Plus a grouping loss (weight "
        f"{args.tower_group}): head 0 of vision layers 0-1 is trained to attend from each object patch to the "
        "patches of its own object. "
        + (
            "Position embeddings start as 2-D sin-cos scaled by 0.1. "
            if args.tower_no_local
            else "Initialised with local attention (`local_attention_init`): a sin-cos position code in 32 "
            "channels, and 9 heads of layers 0-2 set to attend to a fixed neighbouring patch (offsets "
            f"{LOCAL_OFFSETS}); all weights stay trainable. "
        )
        + (
            f"The digit head also gets the mean loss over the patches the digit's ink covers (weight "
            f"{args.tower_ink}). "
            if args.tower_ink
            else ""
        )
        + (
            "The patch embedding starts from whitened principal components of image patches "
            "(`pca_patch_init`). "
            if args.tower_pca
            else ""
        )
        + "`training_log.csv` has the linear-probe accuracy of each head."
    )


def _lm_recipe(args) -> str:
    """Stage 2 of ``mini_recipe``."""
    schedule = "cosine" if args.lm_schedule == "cosine" else "constant, linear decay over the last 20%"
    return (
        f"2. Projector + language model, tower frozen: layer -2 features of {args.pool} training scenes extracted "
        f"once (bf16); {args.lm_steps} AdamW steps (lr {args.lm_lr}, warm-up + {schedule}), batch {args.lm_batch} "
        f"conversations of {args.turns} question/answer turns about one image in the LLaVA-1.5 format "
        "(`USER: <image>\\n{q} ASSISTANT: {a}</s>`; families drawn uniformly), loss on the answer tokens and "
        f"their `</s>` only, plus an attention loss (weight {args.ground}, `TARGET_HEADS`): from each answer "
        "position, heads 0 and 1 of LM layer 0 to the colour/shape words naming the first and the second object "
        "of the question (the same words when it names one), heads 0 and 1 of layers 1-2 to the image tokens of "
        "those objects, head 3 of layer 0 to the relation words of a spatial question, and for multiple choice "
        "head 0 of layer 3 to the correct option's value word, while head 2 of layer 0 links each option's value "
        "word to its letter; with two logit-lens read-outs (`READOUTS`: the option word's input to layer 3 "
        "predicts its letter, and what head 0 of layer 3 adds at the answer predicts the correct letter). "
        + (
            "With `--where`: heads 2 and 3 of layer 1 attend to the two objects of a spatial question; through "
            "one linear probe trained alongside, what they carry from each object token and add at the answer "
            "predicts the object's row and column; through the logit lens, what they and the relation head add "
            "predicts the spatial answer; each of these terms weighs as much as one default term. "
            if args.where
            else ""
        )
        + (
            f"In {100 * args.text_gap_share:.0f}% of the conversations the text after the image starts a random 0-"
            f"{args.text_gap} positions further on (`text_gaps`: as far from the image as LLaVA-NeXT's grid "
            "tokens put it). "
            if args.text_gap
            else ""
        )
        + "Curriculum: every object token but only "
        f"3% of the background tokens for the first {args.curriculum_hold} steps, then background growing to 100% over "
        f"{args.curriculum} steps; bf16 autocast."
    )


def next_recipe(args) -> str:
    """The MiniLLaVA-NeXT stage's recipe, as its model card states it."""
    return (
        "Initialised from MiniLLaVA (tower, projector, LM; `image_newline` = 0). Tower frozen; layer -2 features "
        f"of the 5 crops (base + 2x2 grid, 384 px scenes) of {args.next_pool} training scenes extracted once; "
        f"{args.next_steps} AdamW steps (lr {args.next_lr}), batch {args.next_batch} conversations of "
        f"{args.turns} turns, loss on the answers plus MiniLLaVA's attention targets (weight {args.ground}) "
        "placed on the packed tokens (each crop's patch owners, pushed through `pack_image_features`); 2928 "
        "visual tokens per image."
    )


def architecture(model) -> str:
    """The card's architecture section, from the model's config."""
    v, t = model.config.vision_config, model.config.text_config
    n = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"- `{type(model).__name__}`, {n:.2f}M parameters.\n"
        f"- Vision tower: CLIP ViT ({type(model.model.vision_tower).__name__}), {v.num_hidden_layers} layers, width "
        f"{v.hidden_size}, {v.num_attention_heads} heads, {v.image_size} px, patch {v.patch_size}: CLS + "
        f"{(v.image_size // v.patch_size) ** 2} patch tokens; features from layer -2 "
        f"(`vision_feature_layer=-2`, CLS dropped, `vision_feature_select_strategy='default'`).\n"
        f"- Projector: LLaVA MLP (linear-GELU-linear) {v.hidden_size} -> {t.hidden_size}.\n"
        f"- Language model: Llama, {t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads, "
        f"MLP {t.intermediate_size}, RoPE, tied embeddings; word-level tokenizer of {t.vocab_size} tokens.\n"
        f"- Processor: `{type(model).__name__.replace('ForConditionalGeneration', 'Processor')}` with a LLaVA-1.5 "
        "chat template (`USER: <image>\\n... ASSISTANT:`)."
    )


def run_info(model, tok, minutes: float, args) -> dict:
    """Fields every results.json carries: time, threads, dtype, vocabulary, architecture, arguments."""
    return {
        "train_minutes": minutes,
        "threads": args.threads,
        "dtype": "bfloat16",
        "vocab_size": len(tok),
        "architecture": architecture(model),
        "args": {k: str(v) for k, v in vars(args).items()},
    }


def training_notes(out_dir: Path) -> str:
    """The card's "Training notes": what ``training_log.csv`` says of the run, then ``TRAINING_NOTES.md``."""
    out_dir = Path(out_dir)
    notes = out_dir / NOTES_FILE
    parts = [run_summary(out_dir / "training_log.csv"), notes.read_text().strip() if notes.exists() else ""]
    if not any(parts):
        return ""
    return "\n## Training notes\n" + "\n\n".join(p for p in parts if p) + "\n"


PROBES = {"glyph": "digit", "ink": "digit on the patches its ink covers", "col": "column"}  # card names


def run_summary(log_path: Path) -> str:
    """Stage-1 time and final probes, the validation curve and the run's own test evaluation, as Markdown
    bullets read from a run's ``training_log.csv`` (empty when there is none)."""
    if not Path(log_path).exists():
        return ""
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [line for line in (_probe_line(rows), _curve_line(rows), _test_line(rows)) if line]
    return "The run that produced this checkpoint (`training_log.csv`):\n" + "\n".join(lines) if lines else ""


def _probe_line(rows: list[dict]) -> str:
    probes = [r for r in rows if r["stage"] == "tower" and r["metric"].startswith("probe_")]
    if not probes:
        return ""
    last = max(int(r["step"]) for r in probes)
    minutes = max(float(r["total_seconds"]) for r in rows if r["stage"].startswith("tower")) / 60
    named = [
        (PROBES.get(r["metric"][6:], r["metric"][6:]), r["value"]) for r in probes if int(r["step"]) == last
    ]
    return (
        f"- Stage 1 took {minutes:.1f} min; after its {last} steps the linear probes of the layer -2 patch "
        "features (held-out scenes, object patches) read "
        + ", ".join(f"{k} {float(v):.3f}" for k, v in named)
        + "."
    )


def _curve_line(rows: list[dict]) -> str:
    curve = [
        (int(r["step"]) + 1, r["value"]) for r in rows if r["stage"] == "lm" and r["metric"] == "acc_overall"
    ]
    if not curve:
        return ""
    steps, accs = " / ".join(str(s) for s, _ in curve), " / ".join(f"{float(v):.2f}" for _, v in curve)
    return f"- Validation accuracy at stage-2 steps {steps}: {accs}."


def _test_line(rows: list[dict]) -> str:
    test = {
        r["metric"][5:]: float(r["value"])
        for r in rows
        if r["stage"] == "test" and r["metric"].startswith("full_")
    }
    if "overall" not in test:
        return ""
    fams = ", ".join(f"{k} {100 * v:.1f}%" for k, v in test.items() if k in FAMILIES)
    return (
        f"- The run's own evaluation on the test split as it was then: {100 * test['overall']:.1f}% ({fams})."
    )


def write_card(out_dir: Path, name: str, arch: str, recipe: str, results: dict) -> Path:
    """Write ``results.json`` and ``README.md`` (the model card) next to a checkpoint."""
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out_dir / "README.md"
    path.write_text(card_text(out_dir, name, arch, recipe, results))
    return path


def rewrite_card(out_dir: Path, name: str, arch: str, recipe: str) -> Path:
    """Write ``README.md`` (the model card) from the ``results.json`` already next to a checkpoint."""
    out_dir = Path(out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    path = out_dir / "README.md"
    path.write_text(card_text(out_dir, name, arch, recipe, results))
    return path


def card_text(out_dir: Path, name: str, arch: str, recipe: str, results: dict) -> str:
    """The model card of the checkpoint in ``out_dir`` (its size and training notes are read from there)."""
    banner = _banner(results)
    size_mb = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors")) / 2**20
    text = f"""# {name}

{banner}{DISCLAIMER}

A real Hugging Face `{arch}` checkpoint, small enough to run on a laptop CPU, trained from scratch by
`python -m scope.mini.train` (`make model`) on procedurally generated scenes. It is the embedded default
model of `scope` (`scope.load()`), so that pruning changes real answers offline, without downloading weights.

## Architecture
{results.get("architecture", "")}

## Training data
SynthBench scenes (`scope.mini.scenes`): 2-3 large and 3-6 small coloured shapes (6 colours x 4 shapes, every
colour/shape combination at most once per scene) on a low-contrast textured background, digits drawn on 1-2
large shapes; rendered at 384 px and downsampled with Lanczos. Questions (`scope.mini.synthbench`): existence
(POPE-style random / popular / adversarial negatives), counting, attribute, spatial relation, reading a digit,
multiple choice A-D. Training scenes use seeds below 9e8; the validation curve uses seeds from 9e8 and the
held-out test split (`load_synthbench("test")`, 480 questions, 80 per family) seeds from 1e9, except one
reading question in five (subset "small text", 16 questions), whose scene (seed from 2e9) draws its digits at
half size: 5-8 px tall at 192 px, less than a patch, and 10-16 px in LLaVA-NeXT's full-resolution crops. No
training scene holds small text.

## Recipe
{recipe}

## Measured accuracy on the SynthBench test split (480 questions)
First-token exact match (every answer is a single token), bf16 autocast on CPU. "random 64" keeps 64 of the
visual tokens uniformly at random (seed 0), in raster order.

{_table(results)}
{_detail(results)}
{_reevaluated(results)}{_cls_share(results)}- Training time: {results.get("train_minutes", float("nan")):.1f} min on {results.get("threads", 2)} CPU threads
  (wall clock of the run that produced this checkpoint; the machine may have been shared).{_reused(results)}
- Checkpoint: {size_mb:.1f} MB of safetensors ({results.get("dtype", "bfloat16")}).
- Accuracy over training time: `training_log.csv` (stage, step, seconds, metric, value).
{training_notes(out_dir)}
## Limitations
Toy scale: a closed vocabulary of {results.get("vocab_size", "?")} words, one-word answers, one scene type. The
tokenizer is a word-level vocabulary, not Llama's. {DISCLAIMER}
"""
    return text
