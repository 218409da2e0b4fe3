"""Prefill FLOPs of Video-LLaVA (one video) pruned by a pre-LLM method, counted as :mod:`scope.efficiency`
counts LLaVA's: the published 7B config (``data/configs/video-llava-7b``) built on the meta device, matmuls
counted by FlopCounterMode, the selection's elementwise work from the method record's closed form.

A video is 8 frames of 224 px; the video tower runs on every frame and the LLM reads 257 tokens per frame
(256 patches + CLS, :mod:`scope.patch.video_llava`): 2,056 unpruned. A budget is split evenly over the
frames, ``k = budget // frames`` each, the CLS included (the patch's default ``keep_frame_cls=True``).
The vision side (tower + CLS saliency) is counted by running :func:`scope.patch.llava.vision_features`, the
function the patch calls, on meta frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from scope.efficiency import (
    count_flops,
    gflops_fields,
    kv_cache_mb,
    llm_flops,
    load_config,
    meta_model,
    projector_flops,
    selection_flops,
)
from scope.methods import NONE, PRE_LLM, UNPRUNED, get_method

__all__ = [
    "VIDEO_CONFIG",
    "VIDEO_BUDGETS",
    "FRAMES",
    "video_tokens",
    "video_prefill_flops",
    "video_flops_table",
]

VIDEO_CONFIG = "video-llava-7b"
VIDEO_BUDGETS = (136,)  # Table 3: 136 of 2,048 visual tokens
FRAMES = 8  # Video-LLaVA samples 8 frames per video


def video_tokens(config=VIDEO_CONFIG, frames: int = FRAMES, budget: int | None = None) -> dict:
    """Token counts of one video: patches and tokens per frame, tokens entering the LLM unpruned
    (``frames * (patches + 1)``) and at ``budget`` (``frames * min(budget // frames, patches + 1)``)."""
    from scope.patch.video_llava import frame_budget

    v = load_config(config).vision_config
    patches = (v.image_size // v.patch_size) ** 2
    per_frame = patches + 1
    k = frame_budget(budget, frames, per_frame)
    return {
        "frames": frames,
        "patches_per_frame": patches,
        "tokens_per_frame": per_frame,
        "unpruned": frames * per_frame,
        "kept_per_frame": k,
        "kept": frames * k,
    }


def _vision_flops(model, frames: int, saliency: bool) -> int:
    from scope.patch.llava import vision_features

    v = model.config.vision_config
    pixels = torch.empty(frames, 3, v.image_size, v.image_size, device="meta")
    tower = model.model.video_tower
    if not saliency:
        return count_flops(tower, pixels, output_hidden_states=True)
    return count_flops(vision_features, model, pixels, None, "full", True, tower)


def video_prefill_flops(
    config=VIDEO_CONFIG,
    method: str = "scope",
    budget: int | None = None,
    frames: int = FRAMES,
    prompt_tokens: int = 64,
) -> dict:
    """One row of the video FLOP table: tokens and FLOPs of one prefill (one video of ``frames`` frames and
    ``prompt_tokens`` text tokens, logits of the last position) pruned by the pre-LLM ``method`` to ``budget``
    tokens per video; ``budget=None`` is the unpruned model."""
    config = load_config(config)
    record = get_method(UNPRUNED if budget is None else method)
    if record.stage not in (PRE_LLM, NONE):
        raise ValueError(
            f"method {method!r} is not a pre-LLM method; Video-LLaVA is pruned before the LLM only"
        )
    model = meta_model(config)
    tokens = video_tokens(config, frames, budget)
    kept, k = tokens["kept"], tokens["kept_per_frame"]
    t = config.text_config
    llm = llm_flops(model, [prompt_tokens + kept] * t.num_hidden_layers)
    tower = _vision_flops(model, frames, False)
    sal = _vision_flops(model, frames, True) - tower if record.needs_saliency() else 0
    sel = 0
    if record.stage == PRE_LLM and k > 1:  # k - 1 patches per frame are selected, the CLS is kept
        d = config.vision_config.hidden_size
        sel = selection_flops(record.name, frames * (k - 1), frames, tokens["patches_per_frame"], d)["total"]
    proj = projector_flops(model, kept)
    return {
        "model": getattr(config, "_name_or_path", "") or "",
        "method": record.name,
        "budget": budget if budget is not None else tokens["unpruned"],
        "frames": frames,
        "visual_in": tokens["unpruned"],
        "visual_kept": kept,
        "prompt_tokens": prompt_tokens,
        **gflops_fields(tower, sal, sel, llm, projector=proj),
        "kv_cache_mb": kv_cache_mb(t, [prompt_tokens + kept] * t.num_hidden_layers),
    }


def video_flops_table(
    config=VIDEO_CONFIG,
    budgets: Sequence[int] = VIDEO_BUDGETS,
    methods: Sequence[str] = ("scope", "visionzip"),
    frames: int = FRAMES,
    prompt_tokens: int = 64,
) -> pd.DataFrame:
    """Prefill FLOPs of ``config`` x method x budget plus the unpruned row, with ``flops_ratio`` (unpruned
    total / pruned total) and ``llm_ratio`` (the same for the LLM alone). Table 3's budget by default."""
    jobs = [(UNPRUNED, None)] + [(m, b) for b in budgets for m in methods]
    df = pd.DataFrame([video_prefill_flops(config, m, b, frames, prompt_tokens) for m, b in jobs])
    df["model"] = str(config)
    base = df[df.method == UNPRUNED].iloc[0]
    df["flops_ratio"] = base.total_gflops / df.total_gflops
    df["llm_ratio"] = base.llm_gflops / df.llm_gflops
    return df
