"""Train MiniLLaVA (and MiniLLaVA-NeXT) from scratch on SynthBench-style scenes, on CPU.

Recipe (two stages, as LLaVA, then the anyres stage):
1. Vision tower (``scope.mini.tower``). CLIP is trained contrastively on captions; we have exact scene
   annotations instead, so the tower learns (a) a CLS objective -- which colour/shape combinations are present
   and how many of each shape/colour -- computed from the CLS token of layer -2, so CLS attention in that
   layer concentrates on the objects (the saliency SCOPE uses), and (b) a dense per-patch objective on the
   layer -2 patch features (colour, shape, size, glyph of the object under the patch, whether the patch holds
   an object centre, and the grid row/column of the object's centre as ordinal targets; ``scope.mini.labels``),
   so the features that reach the projector carry what the questions ask about; the digit head also gets a
   mean loss over the patches the digit's ink covers (``--tower-ink``). The tower starts from
   ``local_attention_init`` (heads attending to fixed neighbouring patches) with its patch embedding set to
   whitened principal components of image patches (``pca_patch_init``, ``--tower-pca``), and a warm-up on
   the shape and digit heads alone; every ``probe_every`` steps the linear heads are scored on held-out
   scenes ("probes": what the patch features carry), and the scores go to ``training_log.csv``.
2. Projector + language model, tower frozen (``scope.mini.lm``): layer -2 features of a pool of scenes are
   extracted once without grad (bf16), and each training sequence packs several question/answer turns about
   one image (LLaVA-1.5's multi-turn format with the image first, loss on the answers only). Attention
   targets (``scope.mini.targets``) tell chosen heads where to look: the names of the question's objects,
   their image tokens (one head per object when there are two), the relation words of a spatial question,
   and for multiple choice the correct option's value word; logit-lens read-outs make the option head carry
   that option's letter to the answer, and (``--where``) the position heads carry where the objects are.
   Stage 2 escapes its plateau of answer priors only with the attention targets, and learns multiple choice
   only with the read-outs.
3. MiniLLaVA-NeXT: MiniLLaVA's weights in a ``LlavaNextForConditionalGeneration``, trained further on the
   packed anyres tokens of 384 px scenes with the same attention targets.

``python -m scope.mini.train --all`` (``make model``) retrains and saves both checkpoints; every stage has a
tqdm bar and appends to ``training_log.csv`` (held-out accuracy over training time). The model cards
(``scope.mini.card``) state the recipe, what the checkpoints score, and in their "Training notes" how the
recipe came about and what each of its parts bought.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from scope.mini.card import (
    mini_recipe,
    next_recipe,
    rewrite_card,
    run_info,
    target_status,
    write_card,
)
from scope.mini.evaluate import (
    cls_concentration,
    evaluate_features,
    measure_minillava,
    measure_next,
    val_items,
)
from scope.mini.features import extract_features, extract_next_features
from scope.mini.labels import VAL_SEED_BASE
from scope.mini.lm import train_lm
from scope.mini.model import build_config, build_model, build_processor, build_tokenizer
from scope.mini.next import build_next_processor, next_from_mini
from scope.mini.sequences import Seq
from scope.mini.targets import READOUTS, TARGET_HEADS, WHERE_READOUTS
from scope.mini.tower import train_tower
from scope.paths import MINILLAVA_DIR, MINILLAVA_NEXT_DIR

MINI = ("MiniLLaVA", "LlavaForConditionalGeneration")  # card name, architecture
NEXT = ("MiniLLaVA-NeXT", "LlavaNextForConditionalGeneration")


class RunLog:
    """Appends (stage, step, stage seconds, total seconds, metric, value) rows to training_log.csv."""

    def __init__(self, path: Path):
        self.t0 = time.time()
        self.f = open(path, "w", newline="")
        self.w = csv.writer(self.f)
        self.w.writerow(["stage", "step", "stage_seconds", "total_seconds", "metric", "value"])

    def __call__(self, stage: str, step: int, secs: float, metrics: dict) -> None:
        for k, v in metrics.items():
            self.w.writerow([stage, step, f"{secs:.1f}", f"{time.time() - self.t0:.1f}", k, f"{v:.4f}"])
        self.f.flush()

    def minutes(self) -> float:
        return (time.time() - self.t0) / 60


def rebuild_flags(args) -> str:
    """The command-line flags that set ``args`` apart from the ``make model`` defaults (for the card)."""
    default = parser().get_default
    flags = ""
    for dest in ("where", "tower_ink", "tower_pca", "text_gap", "text_gap_share", "lm_schedule"):
        value, flag = getattr(args, dest), dest.replace("_", "-")
        if value == default(dest):
            continue
        if isinstance(value, bool):
            flags += f" --{flag}" if value else f" --no-{flag}"
        else:
            flags += f" --{flag} {value}"
    return flags


def card_recipe(args) -> str:
    """MiniLLaVA's recipe as its card states it, ending with the command that rebuilds it from ``args``."""
    return mini_recipe(args, rebuild_flags(args))


def where_options(args) -> dict:
    """``train_lm``'s targets and read-outs: the core ones, plus the position ones with ``--where`` (the default)."""
    if not args.where:
        return {}
    return {"targets": tuple(TARGET_HEADS), "readouts": (*READOUTS, *WHERE_READOUTS)}


def _save_cache_minutes(path: Path, minutes: float) -> None:
    """Record next to a stage-1 cache (tower checkpoint, pool features) how long it took to compute."""
    Path(f"{path}.json").write_text(json.dumps({"minutes": minutes}) + "\n")


def _cache_minutes(path: Path) -> float | None:
    """The minutes ``_save_cache_minutes`` recorded for a cache, ``None`` if it was saved without them."""
    side = Path(f"{path}.json")
    return json.loads(side.read_text())["minutes"] if side.exists() else None


def train_minillava(out_dir: Path, args) -> tuple:
    """Stage 1 + stage 2, evaluate on the test split, save model + processor + card to ``out_dir``."""
    torch.manual_seed(args.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir / "training_log.csv")
    tok = build_tokenizer()
    processor = build_processor(tok)
    config = build_config(tok, args.vision_layers, args.vision_width, args.lm_layers, args.lm_width)
    model = build_model(config, args.seed)
    reused = {}  # stage-1 outputs loaded from --tower-ckpt / --feature-cache, for the card's training time
    stage1(model, args, log, reused)
    if args.tower_only:
        return model, tok, log
    seq = Seq(tok)
    stage2(model, seq, args, log, reused)
    results = final_evaluation(model, seq, log) | run_info(model, tok, log.minutes(), args)
    if reused:
        results["stage1_reused"] = reused
    results["status"] = target_status(results)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    model.float()
    write_card(out_dir, *MINI, card_recipe(args), results)
    print(f"saved {out_dir} after {log.minutes():.1f} min")
    return model, tok, log


def stage1(model, args, log, reused: dict) -> None:
    """Train the vision tower (``train_tower``), or load it from ``--tower-ckpt`` when that exists (noted in
    ``reused``); a ``--tower-ckpt`` that does not exist yet receives the trained tower."""
    ckpt = args.tower_ckpt
    if ckpt is not None and ckpt.exists():
        model.model.vision_tower.load_state_dict(torch.load(ckpt, weights_only=True))
        print(f"loaded tower from {ckpt}")
        reused["tower"] = (f"`{ckpt}`", _cache_minutes(ckpt))
        return
    train_tower(
        model, args.tower_steps, args.tower_batch, args.tower_lr, args.seed, log, args.tower_window,
        zoom=args.tower_zoom, group=args.tower_group, local=not args.tower_no_local, warmup=args.tower_warmup,
        ink=args.tower_ink, pca=args.tower_pca,
    )  # fmt: skip
    if ckpt is not None:
        torch.save(model.model.vision_tower.state_dict(), ckpt)
        _save_cache_minutes(ckpt, log.minutes())


def pool_features(model, pool, cache: Path | None, reused: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer -2 features and patch owners of the stage-2 pool, or those saved in ``cache`` when it exists."""
    if cache is not None and cache.exists():
        reused["features"] = (f"`{cache}`", _cache_minutes(cache))
        return torch.load(cache, weights_only=True)
    t0 = time.time()
    feats, masks = extract_features(model, pool, desc="features (train pool)", with_masks=True)
    if cache is not None:
        torch.save((feats, masks), cache)
        _save_cache_minutes(cache, (time.time() - t0) / 60)
    return feats, masks


def stage2(model, seq: Seq, args, log, reused: dict) -> None:
    """Projector + LM (``train_lm``) on the pool's cached features, with the validation curve in ``log``."""
    pool = np.random.default_rng(args.seed + 1).integers(0, VAL_SEED_BASE, size=args.pool)
    feats, masks = pool_features(model, pool, args.feature_cache, reused)
    vitems = val_items()
    vfeats = extract_features(model, np.array([it["seed"] for it in vitems]), desc="features (val)")
    train_lm(
        model, seq, feats, pool, args.lm_steps, args.lm_batch, args.turns, args.lm_lr, args.seed, log,
        lambda: evaluate_features(model, seq, vfeats, vitems), args.eval_every, masks=masks,
        **where_options(args), curriculum=args.curriculum, curriculum_hold=args.curriculum_hold,
        ground=args.ground, gap=args.text_gap, gap_share=args.text_gap_share, schedule=args.lm_schedule,
    )  # fmt: skip


def final_evaluation(model, seq: Seq, log) -> dict:
    """MiniLLaVA's accuracy (``measure_minillava``) and CLS concentration, logged and printed."""
    results = measure_minillava(model, seq)
    results["cls_top10_share"], results["cls_images"] = cls_concentration(model)
    full, rand64 = results["full"], results["random64"]
    row = {f"full_{k}": v for k, v in full.items()} | {f"random64_{k}": v for k, v in rand64.items()}
    log("test", 0, 0.0, row | {"cls_top10_share": results["cls_top10_share"]})
    print("test full:", {k: round(v, 3) for k, v in full.items()})
    print("test random-64:", {k: round(v, 3) for k, v in rand64.items()})
    print(f"CLS top-10% share: {results['cls_top10_share']:.3f}")
    return results


def train_minillava_next(mini, tok, out_dir: Path, args) -> None:
    """Initialise LLaVA-NeXT from MiniLLaVA; train projector + LM (+ image_newline) on anyres inputs."""
    torch.manual_seed(args.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir / "training_log.csv")
    model = next_from_mini(mini)
    processor = build_next_processor(tok)
    seq = Seq(tok)
    pool = np.random.default_rng(args.seed + 2).integers(0, VAL_SEED_BASE, size=args.next_pool)
    feats, masks = extract_next_features(
        model, processor, pool, desc="NeXT features (train pool)", with_masks=True
    )
    vitems = val_items(20)
    vseeds = np.array([it["seed"] for it in vitems])
    vfeats = extract_next_features(model, processor, vseeds, desc="NeXT features (val)")
    train_lm(
        model, seq, feats, pool, args.next_steps, args.next_batch, args.turns, args.next_lr, args.seed, log,
        lambda: evaluate_features(model, seq, vfeats, vitems, batch=8), max(1, args.next_steps // 4),
        masks=masks, ground=args.ground, **where_options(args),
    )  # fmt: skip
    del feats
    measured = measure_next(model, seq, processor)
    mini_results = json.loads((args.out or MINILLAVA_DIR).joinpath("results.json").read_text())
    results = {
        "full": measured["full"],
        "random64": {},
        "minillava_full": mini_results["full"],
        "detail": measured["detail"],
        "minillava_detail": mini_results.get("detail", {}),
        **run_info(model, tok, log.minutes(), args),
    }
    results["status"] = target_status(results)
    log("test", 0, 0.0, {f"full_{k}": v for k, v in results["full"].items()})
    print("NeXT test full:", {k: round(v, 3) for k, v in results["full"].items()})
    model.to(torch.bfloat16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    write_card(out_dir, *NEXT, next_recipe(args), results)
    print(f"saved {out_dir} after {log.minutes():.1f} min")


@torch.no_grad()
def reevaluate(args) -> None:
    """Re-measure the saved checkpoints on the current test split; rewrite results.json and the cards.

    The weights are not touched: this is for a change of the held-out split (e.g. the small-text reading
    questions), so that the cards state what the shipped checkpoints score on the split the notebooks use.
    Training facts (time, curves, arguments) are kept from the run that made the checkpoints.
    """
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    mini_dir, next_dir = args.out or MINILLAVA_DIR, args.next_out or MINILLAVA_NEXT_DIR
    tok = build_tokenizer()
    seq = Seq(tok)
    mini = LlavaForConditionalGeneration.from_pretrained(mini_dir, dtype=torch.float32).eval()
    results = json.loads((mini_dir / "results.json").read_text()) | measure_minillava(mini, seq)
    results["reevaluated"] = True
    results["status"] = target_status(results)
    print("MiniLLaVA test full:", {k: round(v, 3) for k, v in results["full"].items()})
    print("MiniLLaVA test random-64:", {k: round(v, 3) for k, v in results["random64"].items()})
    write_card(mini_dir, *MINI, card_recipe(args), results)
    del mini
    nxt = LlavaNextForConditionalGeneration.from_pretrained(next_dir, dtype=torch.float32).eval()
    measured = measure_next(nxt, seq, build_next_processor(tok))
    next_results = json.loads((next_dir / "results.json").read_text())
    next_results["full"] = measured["full"]
    next_results["minillava_full"] = results["full"]
    next_results["detail"] = measured["detail"]
    next_results["minillava_detail"] = results["detail"]
    next_results["reevaluated"] = True
    next_results["status"] = target_status(next_results)
    print("NeXT test full:", {k: round(v, 3) for k, v in next_results["full"].items()})
    print("detail split, MiniLLaVA:", {k: round(v, 3) for k, v in results["detail"].items()})
    print("detail split, NeXT:", {k: round(v, 3) for k, v in next_results["detail"].items()})
    write_card(next_dir, *NEXT, next_recipe(args), next_results)


def rewrite_cards(args) -> None:
    """Rewrite both model cards from the saved ``results.json`` and ``training_log.csv``, measuring nothing."""
    rewrite_card(args.out or MINILLAVA_DIR, *MINI, card_recipe(args))
    rewrite_card(args.next_out or MINILLAVA_NEXT_DIR, *NEXT, next_recipe(args))


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scope.mini.train``; its defaults are the ``make model`` recipe."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="train MiniLLaVA and then MiniLLaVA-NeXT (make model)")
    p.add_argument("--next-only", action="store_true", help="train MiniLLaVA-NeXT from the saved MiniLLaVA")
    p.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-measure the saved checkpoints on the test split and rewrite their results.json and cards",
    )
    p.add_argument("--out", type=Path, default=None, help="MiniLLaVA output folder (default data/minillava)")
    p.add_argument(
        "--next-out", type=Path, default=None, help="NeXT output folder (default data/minillava-next)"
    )
    p.add_argument(
        "--cards-only",
        action="store_true",
        help="rewrite the model cards from the saved results.json and training_log.csv (measures nothing)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--lm-width", type=int, default=128)
    _tower_options(p)
    _lm_options(p)
    return p


def _tower_options(p: argparse.ArgumentParser) -> None:
    """Stage 1 (``train_tower``)."""
    p.add_argument("--tower-steps", type=int, default=3000)
    p.add_argument("--tower-batch", type=int, default=32)
    p.add_argument("--tower-lr", type=float, default=1e-3)
    p.add_argument(
        "--tower-window", type=int, default=12, help="train stage 1 on windows of this many patches"
    )
    p.add_argument("--tower-zoom", type=float, default=0.3, help="share of full-resolution crops in stage 1")
    p.add_argument("--tower-group", type=float, default=1.0, help="weight of the stage-1 grouping loss")
    p.add_argument(
        "--tower-warmup", type=int, default=500, help="stage-1 warm-up steps on the shape and digit heads"
    )
    p.add_argument(
        "--tower-no-local", action="store_true", help="start stage 1 from sin-cos positions, no local heads"
    )
    p.add_argument(
        "--tower-ink",
        type=float,
        default=1.0,
        help="weight of the stage-1 digit loss on the patches that see it (0: none)",
    )
    p.add_argument(
        "--tower-pca",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the patch embedding from principal components (--no-tower-pca: from random weights)",
    )
    p.add_argument("--tower-ckpt", type=Path, default=None, help="reuse/save the stage-1 tower here")
    p.add_argument("--tower-only", action="store_true")


def _lm_options(p: argparse.ArgumentParser) -> None:
    """Stage 2 (``train_lm``) and the NeXT stage."""
    p.add_argument("--feature-cache", type=Path, default=None, help="reuse/save stage-2 pool features here")
    p.add_argument("--pool", type=int, default=6000)
    p.add_argument("--lm-steps", type=int, default=1700)
    p.add_argument("--lm-batch", type=int, default=16)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--lm-lr", type=float, default=3e-3)
    p.add_argument(
        "--lm-schedule",
        choices=["cosine", "wsd"],
        default="wsd",
        help="stage-2 learning rate after the warm-up: cosine, or wsd (hold the peak, decay over the last 20%%)",
    )
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--ground", type=float, default=1.0, help="weight of the stage-2 grounding loss")
    p.add_argument("--curriculum", type=int, default=800, help="stage-2 steps to grow background tokens")
    p.add_argument(
        "--curriculum-hold", type=int, default=800, help="stage-2 steps at 3%% background tokens first"
    )
    p.add_argument(
        "--text-gap",
        type=int,
        default=0,
        help="stage 2: move the text after the image up to this many positions on (0: never; see text_gaps)",
    )
    p.add_argument(
        "--text-gap-share", type=float, default=0.5, help="share of stage-2 conversations with a --text-gap"
    )
    p.add_argument("--next-pool", type=int, default=1200)
    p.add_argument("--next-steps", type=int, default=100)
    p.add_argument("--next-batch", type=int, default=8)
    p.add_argument("--next-lr", type=float, default=1e-3)
    p.add_argument(
        "--where",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="position heads and read-outs for spatial questions (OPTIONAL_TARGETS, WHERE_READOUTS); "
        "--no-where trains without them (test split: spatial 46%% instead of the card's)",
    )


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    # Trained weights produce denormal floats that x86 CPUs process slowly: flushing them to zero made a
    # stage-2 step of the trained model 1.6x faster (2.30 -> 1.40 s) on 2 cores.
    torch.set_flush_denormal(True)
    out = args.out or MINILLAVA_DIR
    if args.evaluate_only:
        reevaluate(args)
        return
    if args.cards_only:
        rewrite_cards(args)
        return
    if args.next_only:
        from transformers import LlavaForConditionalGeneration

        mini = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        train_minillava_next(mini, build_tokenizer(), args.next_out or MINILLAVA_NEXT_DIR, args)
        return
    mini, tok, _ = train_minillava(out, args)
    if args.all and not args.tower_only:
        train_minillava_next(mini, tok, args.next_out or MINILLAVA_NEXT_DIR, args)


if __name__ == "__main__":
    main()
