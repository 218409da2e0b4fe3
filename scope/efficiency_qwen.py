"""Prefill FLOPs of Qwen2-VL / Qwen2.5-VL pruned by a pre-LLM method, counted as :mod:`scope.efficiency` counts
LLaVA's (the published 7B configs in ``data/configs``, built on the meta device, matmuls counted by
FlopCounterMode; the selection's elementwise work from the method record's closed form).

Visual tokens depend on the image size (native resolution): the processor resizes an image to multiples of
28 px (patch 14 x merge 2) with ``min_pixels <= h * w <= max_pixels`` (transformers' ``smart_resize``; the
published ``preprocessor_config.json`` has 3136 and 12845056), the tower runs on ``(h / 14) * (w / 14)``
patches and the merger emits one token per 2x2 patch block: 640x480 -> 476x644 px -> 34 x 46 patches ->
391 tokens. The default image is 640x480 (COCO-sized, as GQA and POPE images are).

Conventions (as :mod:`scope.efficiency`): one image + ``prompt_tokens`` text tokens, logits for the last
position only, dense attention, the whole tower counted (the merger included: it runs before pruning, so it
is not a per-budget cost). The saliency is counted as :mod:`scope.patch.qwen2_vl` computes it (the
``"attention"`` source: q/k of every patch and the full attention of the last block, recomputed). A
``budget`` is a count of tokens or a float share of the image's tokens, as in ``scope.patch``.
"""

from __future__ import annotations

import functools
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
    selection_flops,
)
from scope.methods import NONE, PRE_LLM, UNPRUNED, get_method

__all__ = [
    "QWEN_CONFIGS",
    "QWEN_BUDGETS",
    "IMAGE_SIZE",
    "visual_tokens",
    "qwen_prefill_flops",
    "qwen_flops_table",
]

QWEN_CONFIGS = ("qwen2-vl-7b-instruct", "qwen2.5-vl-7b-instruct")
QWEN_BUDGETS = (0.25, 0.1)  # Table 8: 25% and 10% of the visual tokens
IMAGE_SIZE = (640, 480)  # (width, height)
MIN_PIXELS, MAX_PIXELS = 3136, 12845056  # the published preprocessor_config.json of both checkpoints


def visual_tokens(
    config,
    image_size: tuple[int, int] = IMAGE_SIZE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> dict:
    """How an image of ``image_size`` = (width, height) px is cut: the resized size, the patch grid
    ``grid_thw`` (t = 1 for an image), the tower's patches and the merged tokens the LLM would read."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    v = load_config(config).vision_config
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image_size must be positive (width, height), got {image_size!r}")
    factor = v.patch_size * v.spatial_merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    grid = (1, h // v.patch_size, w // v.patch_size)
    patches = grid[1] * grid[2]
    return {
        "resized": (w, h),
        "grid_thw": grid,
        "patches": patches,
        "tokens": patches // v.spatial_merge_size**2,
    }


def _block_inputs(model, grid: tuple[int, int, int]):
    """Meta hidden states and rotary tables of ``grid``'s patches, and the real cu_seqlens (full, windows)."""
    visual = model.model.visual
    attn = visual.blocks[0].attn
    n = grid[0] * grid[1] * grid[2]
    hidden = torch.empty(n, attn.dim, device="meta")
    cos_sin = (torch.empty(n, attn.head_dim, device="meta"), torch.empty(n, attn.head_dim, device="meta"))
    full = torch.tensor([0, n], dtype=torch.int32)
    windows = full
    if getattr(visual, "window_size", None) is not None:
        from transformers.vision_utils import get_vision_window_index

        _, windows = get_vision_window_index(
            torch.tensor([grid]), visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
    return hidden, cos_sin, full, windows


@functools.lru_cache(maxsize=64)
def _vision_flops(config_key: str, grid: tuple[int, int, int]) -> tuple[int, int]:
    """(tower incl. merger, attention saliency) FLOPs of one image of ``grid`` patches."""
    from scope.patch.qwen2_vl import attention_scores

    model = _MODELS[config_key]
    visual = model.model.visual
    hidden, cos_sin, full, windows = _block_inputs(model, grid)
    pixels = torch.empty(hidden.shape[0], visual.patch_embed.proj.weight[0].numel(), device="meta")
    total = count_flops(visual.patch_embed, pixels) + count_flops(visual.merger, hidden)
    full_blocks = getattr(visual, "fullatt_block_indexes", None)
    per_block = {}
    for i, block in enumerate(visual.blocks):
        cu = full if full_blocks is None or i in full_blocks else windows
        key = "full" if cu is full else "window"
        if key not in per_block:
            per_block[key] = count_flops(block, hidden, cu_seqlens=cu, position_embeddings=cos_sin)
        total += per_block[key]
    saliency = count_flops(attention_scores, visual.blocks[-1].attn, hidden, full, cos_sin, "attention")
    return total, saliency


_MODELS: dict[str, torch.nn.Module] = {}


def qwen_prefill_flops(
    config,
    method: str = "scope",
    budget: int | float | None = None,
    image_size=IMAGE_SIZE,
    prompt_tokens: int = 64,
) -> dict:
    """One row of the Qwen FLOP table: tokens and FLOPs of one prefill (one image of ``image_size``) of
    ``config`` pruned by the pre-LLM ``method`` to ``budget`` (count or share); ``budget=None`` is unpruned."""
    from scope.patch.qwen2_vl import tokens_to_keep

    config = load_config(config)
    record = get_method(UNPRUNED if budget is None else method)
    if record.stage not in (PRE_LLM, NONE):
        raise ValueError(f"method {method!r} is not a pre-LLM method; Qwen-VL prunes before the LLM only")
    layout = visual_tokens(config, image_size)
    n = layout["tokens"]
    kept = n if budget is None else tokens_to_keep(budget, n)
    key = config.to_json_string()
    _MODELS[key] = model = meta_model(config)
    vision, attention = _vision_flops(key, layout["grid_thw"])
    t = config.text_config
    llm = llm_flops(model, [prompt_tokens + kept] * t.num_hidden_layers)
    sal = attention if record.needs_saliency() else 0
    sel = selection_flops(record.name, kept, 1, n, t.hidden_size)["total"] if record.stage == PRE_LLM else 0
    return {
        "model": getattr(config, "_name_or_path", "") or "",
        "method": record.name,
        "budget": budget if budget is not None else n,
        "image_size": tuple(image_size),
        "visual_in": n,
        "visual_kept": kept,
        "prompt_tokens": prompt_tokens,
        **gflops_fields(vision, sal, sel, llm),  # the merger is counted with the tower
        "kv_cache_mb": kv_cache_mb(t, [prompt_tokens + kept] * t.num_hidden_layers),
    }


def qwen_flops_table(
    configs: Sequence = QWEN_CONFIGS,
    budgets: Sequence[int | float] = QWEN_BUDGETS,
    methods: Sequence[str] = ("scope", "divprune"),
    image_size=IMAGE_SIZE,
    prompt_tokens: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """Prefill FLOPs of each config x method x budget plus the unpruned row, with ``flops_ratio`` (unpruned
    total / pruned total) and ``llm_ratio`` (the same for the LLM alone). Table 8's methods and shares by
    default."""
    from tqdm.auto import tqdm

    rows = []
    for name in configs:
        jobs = [(UNPRUNED, None)] + [(m, b) for b in budgets for m in methods]
        for method, budget in tqdm(jobs, desc=f"FLOPs {name}", disable=not progress):
            row = qwen_prefill_flops(name, method, budget, image_size, prompt_tokens)
            row["model"] = str(name)
            rows.append(row)
    df = pd.DataFrame(rows)
    base = df[df.method == UNPRUNED].set_index("model")
    df["flops_ratio"] = df.model.map(base.total_gflops) / df.total_gflops
    df["llm_ratio"] = df.model.map(base.llm_gflops) / df.llm_gflops
    return df
