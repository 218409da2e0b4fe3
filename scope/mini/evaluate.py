"""Accuracy of MiniLLaVA / MiniLLaVA-NeXT on SynthBench from cached tower features (first answer token).

The validation curve of stage 2 (``val_items``), the test split and the "detail" split (``measure_minillava``,
``measure_next``) and the concentration of the tower's CLS attention (``cls_concentration``).
"""

from __future__ import annotations

import numpy as np
import torch

from scope.mini.features import extract_features, extract_next_features
from scope.mini.labels import VAL_SEED_BASE, scene_batch
from scope.mini.model import N_PATCHES
from scope.mini.scenes import make_scene
from scope.mini.sequences import Seq, embed_images, lm_forward, pad
from scope.mini.synthbench import FAMILIES, detail_items, heldout_items, make_question
from scope.mini.tower import cls_attention, top_share


@torch.no_grad()
def evaluate_features(
    model, seq: Seq, feats, items, budget: int | None = None, seed: int = 0, batch: int = 32
):
    """First-token accuracy per family (answers are one token) with all or ``budget`` random tokens.

    Keys: each family, ``"overall"``, and ``"{family}/{subset}"`` for the reading subsets (text size).
    """
    gen = torch.Generator().manual_seed(seed)
    correct: dict[str, list[float]] = {}
    by_subset: dict[str, list[float]] = {}
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        f = feats[i : i + batch].float()
        if budget is not None:
            keep = torch.stack(
                [torch.randperm(N_PATCHES, generator=gen)[:budget].sort().values for _ in chunk]
            )
            f = torch.gather(f, 1, keep[..., None].expand(-1, -1, f.shape[-1]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img = embed_images(model, f)
            rows = [
                seq.build([{"question": it["question"], "answer": ""}], img.shape[1])[0][:-1] for it in chunk
            ]
            lengths = torch.tensor([len(r) for r in rows])
            hidden = lm_forward(model, img, pad(rows, seq.pad))
            last = hidden[torch.arange(len(rows)), lengths - 1]
            pred = model.lm_head(last).float().argmax(-1)
        for it, p in zip(chunk, pred.tolist()):
            ans = seq.words(it["answer"])[0]
            correct.setdefault(it["family"], []).append(float(p == ans))
            if it["family"] == "reading" and it.get("subset"):
                by_subset.setdefault(f"reading/{it['subset']}", []).append(float(p == ans))
    acc = {k: float(np.mean(v)) for k, v in correct.items()}
    acc["overall"] = float(np.mean([x for v in correct.values() for x in v]))
    return acc | {k: float(np.mean(v)) for k, v in sorted(by_subset.items())}


@torch.no_grad()
def evaluate_detail(model, seq: Seq, next_processor=None) -> dict:
    """Accuracy on the "detail" split (``detail_items``: half-size digits and shapes), all tokens.

    ``next_processor`` (LLaVA-NeXT) encodes each 384 px scene as its anyres crops; without it, the 192 px view.
    """
    items = detail_items()
    seeds = np.array([it["seed"] for it in items])
    if next_processor is None:
        return evaluate_features(model, seq, extract_features(model, seeds, desc="features (detail)"), items)
    feats = extract_next_features(model, next_processor, seeds, desc="NeXT features (detail)")
    return evaluate_features(model, seq, feats, items, batch=8)


def val_items(n_per_family: int = 40) -> list[dict]:
    items = []
    for k in range(n_per_family * len(FAMILIES)):
        seed = VAL_SEED_BASE + k
        qa = make_question(make_scene(seed), FAMILIES[k % 6], np.random.default_rng([seed, 7]))
        items.append({"seed": seed, **qa})
    return items


def measure_minillava(model, seq: Seq) -> dict:
    """MiniLLaVA on the test split with all tokens (``"full"``) and 64 random ones, and on the detail split."""
    titems = heldout_items()
    tfeats = extract_features(model, np.array([it["seed"] for it in titems]), desc="features (test)")
    return {
        "full": evaluate_features(model, seq, tfeats, titems),
        "random64": evaluate_features(model, seq, tfeats, titems, budget=64),
        "detail": evaluate_detail(model, seq),
    }


def measure_next(model, seq: Seq, processor) -> dict:
    """MiniLLaVA-NeXT (anyres crops through ``processor``) on the test split and on the detail split."""
    titems = heldout_items()
    seeds = np.array([it["seed"] for it in titems])
    tfeats = extract_next_features(model, processor, seeds, desc="NeXT features (test)")
    return {
        "full": evaluate_features(model, seq, tfeats, titems, batch=8),
        "detail": evaluate_detail(model, seq, processor),
    }


@torch.no_grad()
def cls_concentration(model, n: int = 96) -> tuple[float, int]:
    """Share of layer -2 CLS attention held by the top 10% of tokens (``top_share``), over the first ``n``
    test images, and the number of images."""
    seeds = np.array([it["seed"] for it in heldout_items()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sal = torch.cat(
            [
                cls_attention(model.model.vision_tower, scene_batch(seeds[i : i + 32])[1]).float()
                for i in range(0, n, 32)
            ]
        )
    return top_share(sal), len(sal)
