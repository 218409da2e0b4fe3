"""Stage 2: projector + language model on multi-turn conversations over cached tower features (tower frozen).

Each training sequence packs several question/answer turns about one image (LLaVA-1.5's multi-turn format,
image first, loss on the answers only). ``build_batch`` draws a batch, ``aux_losses`` (``scope.mini.targets``)
adds the attention targets and read-outs, and ``train_lm`` runs the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from scope.mini.model import N_PATCHES
from scope.mini.scenes import make_scene
from scope.mini.sequences import Seq, embed_images, lm_forward, pad, text_gaps
from scope.mini.synthbench import FAMILIES, make_question
from scope.mini.targets import DEFAULT_TARGETS, READOUTS, BatchTargets, Grounding, aux_losses


def lr_factor(step: int, steps: int, schedule: str = "cosine", decay: float = 0.2) -> float:
    """Share of the peak learning rate at ``step`` of ``steps``: ``"cosine"`` decays from the first step;
    ``"wsd"`` (warm-up, stable, decay) holds the peak and decays linearly to 0 over the last ``decay`` share."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / steps))
    if schedule == "wsd":
        start = (1 - decay) * steps
        return 1.0 if step < start else max(0.0, (steps - step) / (steps - start))
    raise ValueError(f"schedule={schedule!r}: expected 'cosine' or 'wsd'")


class Pool:
    """The training pool of stage 2: scene seeds, their cached features and patch owners, and the random
    streams that draw batches from it (``seed``: rows and questions; a torch generator: the curriculum)."""

    def __init__(self, seq: Seq, feats, seeds, masks: torch.Tensor | None, turns: int, seed: int):
        self.seq, self.feats, self.seeds, self.masks, self.turns = seq, feats, seeds, masks, turns
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.scenes = {}

    def scene(self, seed: int):
        """The scene of ``seed``, made once per run."""
        return self.scenes.get(seed) or self.scenes.setdefault(seed, make_scene(seed))


@dataclass
class Batch:
    """One stage-2 batch: padded conversations, the image tokens of each row and the auxiliary targets."""

    ids: torch.Tensor  # [B, L] token ids, padded
    labels: torch.Tensor  # [B, L] -100 except the answers and their </s>
    images: list[torch.Tensor] | torch.Tensor  # per row: its (kept) projected image tokens
    lengths: list[int]  # unpadded length of each row
    image_ends: list[int]  # position after each row's last image token
    targets: BatchTargets | None  # attention targets and read-outs (with grounding)


def build_batch(model, pool: Pool, size: int, p_bg: float, grounding: Grounding | None) -> Batch:
    """Draw ``size`` scenes of the pool with ``pool.turns`` random questions each; keep every object token
    but only a ``p_bg`` share of the background tokens (the curriculum); collect ``grounding``'s targets."""
    idx = pool.rng.integers(0, len(pool.seeds), size=size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = embed_images(model, pool.feats[torch.from_numpy(idx)].float())
    owners = pool.masks[torch.from_numpy(idx)] if pool.masks is not None else None
    if p_bg < 1.0:
        keep = (owners > 0) | (torch.rand(len(idx), N_PATCHES, generator=pool.gen) < p_bg)
        img = [im[k] for im, k in zip(img, keep)]
        owners = [o[k] for o, k in zip(owners, keep)]
    targets = grounding.new_batch() if grounding is not None else None
    rows, labs, image_ends = [], [], []
    for b, i in enumerate(idx):
        scene = pool.scene(int(pool.seeds[i]))
        qas = [make_question(scene, FAMILIES[int(pool.rng.integers(6))], pool.rng) for _ in range(pool.turns)]
        r, lab, img_start, qpos = pool.seq.build_with_positions(qas, len(img[b]))
        rows.append(r)
        labs.append(lab)
        image_ends.append(img_start + len(img[b]))
        if grounding is not None:
            grounding.collect(targets, pool.seq, b, scene, qas, r, qpos, owners[b], img_start)
    ids, labels = pad(rows, pool.seq.pad), pad(labs, -100)
    return Batch(ids, labels, img, list(map(len, rows)), image_ends, targets)


def batch_losses(model, batch: Batch, grounding: Grounding | None, positions) -> tuple:
    """The answer loss of a batch, and the auxiliary losses by kind with their weighted sum (None if none)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = lm_forward(model, torch.cat(list(batch.images)), batch.ids, positions)
        pos = batch.labels[:, 1:] != -100  # predict token t+1 from position t
        logits = model.lm_head(hidden[:, :-1][pos])
        parts = aux_losses(model, grounding, batch.targets, batch.ids) if grounding is not None else {}
        # each part weighs 1 / (number of default parts present), so opt-in parts add to the default
        # ones instead of diluting them (a plain mean over 15 parts cut each default part to 0.6x)
        core = sum(k in DEFAULT_TARGETS or k in READOUTS for k in parts)
        l_ground = torch.stack(list(parts.values())).sum() / max(1, core) if parts else None
    loss = F.cross_entropy(logits.float(), batch.labels[:, 1:][pos])
    return loss, parts, l_ground


def train_lm(
    model,
    seq: Seq,
    feats,
    seeds,
    steps,
    batch,
    turns,
    lr,
    seed,
    log,
    evaluate_fn,
    eval_every,
    log_every: int = 25,
    masks: torch.Tensor | None = None,
    curriculum: int = 0,
    curriculum_hold: int = 0,
    ground: float = 0.0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    readouts: tuple[str, ...] = READOUTS,
    gap: int = 0,
    gap_share: float = 0.5,
    schedule: str = "cosine",
) -> None:
    """Stage 2: projector + LM on multi-turn conversations over cached tower features (tower frozen).

    Curriculum (``curriculum`` > 0 steps, needs ``masks``): early conversations show the LM every object
    token but only a random share of the background tokens, 3% for the first ``curriculum_hold`` steps and
    then growing to 100% over ``curriculum`` steps (raster order kept); short sequences also make those
    steps several times cheaper. With all 576 tokens from the start, attention over the image is so diffuse
    that the LM first learns only answer priors (a long plateau at chance); with few distractors it learns
    to look things up, then keeps it.
    ``ground`` > 0 (needs ``masks``) adds ``grounding_loss`` (weight ``ground``, averaged over the kinds
    present in a batch) for the ``targets`` kinds of ``TARGET_HEADS`` (see ``turn_targets``): the answer
    position first gathers the objects' names from the question, then looks the objects up in the image.
    Without the name target the query of the object heads is the same for every question (on oracle features
    the object loss stayed at ~1.6 for 500 steps without it, and fell to 0.4 by step 570 with it).
    ``readouts`` (of ``READOUTS``; each needs the targets whose heads it reads) add read-out losses along the
    paths those heads open: each option's letter, the spatial relation and the digit to the answer, and each
    object's position into the "where" heads' values. ``gap`` > 0 moves the text of a ``gap_share`` of the
    conversations up to ``gap`` positions away from their image (``text_gaps``). ``schedule``: the learning
    rate after the warm-up (``lr_factor``).
    """
    grounding = Grounding(model, targets, readouts) if ground and masks is not None and targets else None
    lm_params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    lm_params += grounding.parameters() if grounding is not None else []
    opt = torch.optim.AdamW(lm_params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    pool = Pool(seq, feats, seeds, masks, turns, seed)
    gap_rng = np.random.default_rng([seed, 11])  # its own stream: gap=0 leaves the recipe's draws alone
    t0 = time.time()
    model.train()
    warmup = min(100, max(1, steps // 10))  # a short run (MiniLLaVA-NeXT's) must not end inside its warm-up
    bar = tqdm(range(steps), desc="stage 2: projector + LM")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * lr_factor(step, steps, schedule)
        ramp = max(0, step - curriculum_hold)
        p_bg = min(1.0, 0.03 + ramp / curriculum) if curriculum and masks is not None else 1.0
        b = build_batch(model, pool, batch, p_bg, grounding)
        positions = text_gaps(b.lengths, b.image_ends, gap, gap_share, gap_rng) if gap else None
        loss, parts, l_ground = batch_losses(model, b, grounding, positions)
        opt.zero_grad(set_to_none=True)
        (loss + ground * l_ground if l_ground is not None else loss).backward()
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        opt.step()
        ground_text = f"{l_ground.item():.3f}" if l_ground is not None else "-"
        bar.set_postfix(loss=f"{loss.item():.3f}", ground=ground_text)
        if step % log_every == 0:
            _log_losses(log, step, time.time() - t0, loss, l_ground, parts)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            _evaluate(model, evaluate_fn, log, step, t0, loss)
    if grounding is not None:
        grounding.remove()
    model.eval()


def _log_losses(log, step: int, secs: float, loss, l_ground, parts: dict) -> None:
    ground = {"ground": l_ground.item()} if l_ground is not None else {}
    log(
        "lm",
        step,
        secs,
        {"loss": loss.item(), **ground, **{f"ground_{k}": v.item() for k, v in parts.items()}},
    )


def _evaluate(model, evaluate_fn, log, step: int, t0: float, loss) -> None:
    model.eval()
    acc = evaluate_fn()
    model.train()
    log("lm", step, time.time() - t0, {"loss": loss.item(), **{f"acc_{k}": v for k, v in acc.items()}})
    tqdm.write(f"step {step + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
