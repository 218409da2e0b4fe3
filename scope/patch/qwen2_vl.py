"""Pre-LLM visual-token pruning for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, transformers 5.x), through the same ``scope.patch(model, method, budget)``.

Flow of a patched call (``model(**inputs)`` or ``model.generate(**inputs)``)::

    input_ids, mm_token_type_ids, image_grid_thw -> get_rope_index on the UNPRUNED sequence: M-RoPE positions
                                                    [3, B, L] (temporal, height, width) of every token
    pixel_values -> vision tower; a pre-hook on block L's attention scores every patch (saliency, below)
                 -> merger: N_i merged tokens of image i (one per 2x2 patch block), already in the LLM width
                 -> scope.prune(merged tokens, saliency, K_i, method) per image        kept rows, raster order
                 -> drop the pruned tokens' placeholders AND their position ids; left-pack the rows
                 -> original forward/generate with mm_encoder_outputs and the gathered position_ids

The crux is M-RoPE: a visual token's position is its (t, h, w) place in the image grid and the text after an
image continues from ``start + max(h, w)`` of the *whole* grid. Positions are therefore computed on the
unpruned sequence and the pruned tokens' columns are deleted, so every kept token (visual or text) keeps its
original 3-D position; no token is renumbered. Keeping every token reproduces the unpatched logits exactly.
``generate`` gets the 4-row positions transformers builds for it (compact text positions of the shortened
sequence + the kept 3-D positions), so decoding continues from the last prompt token's position as unpatched;
``model.model.rope_deltas`` is set as ``get_rope_index`` sets it, for callers that continue from a cache.

Budget (per image; images of one batch differ in size): an ``int`` is a count of merged tokens kept per
image, and a budget larger than an image's tokens raises (pass a share instead); a ``float`` in (0, 1] is a
share of each image's tokens, ``K_i = max(1, floor(budget * N_i))`` (Table 8's 25% / 10%: ``budget=0.25``).

Saliency, a deviation: these encoders have no CLS token, so SCOPE's "CLS attention of the feature layer"
does not exist. ``saliency_source`` (a patch option) picks the substitute, all taken at the input of vision
block ``vision_layer`` (default the last block, whose output the merger reads):

- ``"attention"`` (default): the attention each patch *receives*, averaged over the queries of its own
  image and summed over heads, then summed over the 4 patches of a merged token. It reads the same attention
  matrix SCOPE's CLS row is one row of, with every token voting instead of one; recomputed from the block's
  q/k (RoPE applied) by the hook, query chunk by chunk, so the tower keeps SDPA / FlashAttention (tested
  equal to the eager attention weights).
- ``"mean_query"``: the attention row of one pseudo-CLS query, the mean of the image's queries (cheap: one
  row, like the CLS row).
- ``"norm"``: the L2 norm of the merged token (no attention at all).

Qwen2.5-VL attends within 112-px windows in all vision blocks but ``fullatt_block_indexes`` (7, 15, 23, 31
in the 7B); the saliency must come from a full-attention block (a windowed block's received attention only
compares tokens of one window), and the last block (31) is one, so the default works for both versions; a
windowed ``vision_layer`` raises. Inside Qwen2.5-VL's tower the patches are in window order; the scores are
put back in raster order exactly as the merger output is.

Features: the merged tokens (merger output, the embeddings the LLM reads). LLaVA's SCOPE measures coverage on
the pre-projector CLIP features; Qwen's merger is its projector, and its input holds 4 patches per token, so
the merged tokens are the natural unit (the rows that enter the LLM, as for every method on this path).

VisionZip needs CLS attention by definition; here it runs with the same substitute saliency for its dominant
tokens and the merged tokens' keys (mean of their 4 patches' keys, mean over heads) as its merge metric; a
merged contextual token takes the position of the token it stands for (``Pruned.indices``).

Not supported (clear errors): videos, in-LLM methods (FastV / PDrop), ``inputs_embeds`` without ids.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scope.methods import NONE, get_method

from .calls import wrap_calls
from .llava import select_rows, uninstall  # uninstall: the same instance attributes to restore
from .state import PatchState, left_pack

__all__ = [
    "SALIENCY_SOURCES",
    "OPTIONS",
    "check_options",
    "tokens_to_keep",
    "saliency_layer",
    "attention_scores",
    "vision_features",
    "keep_mask",
    "compare_saliency_sources",
    "install",
    "uninstall",
]

SALIENCY_SOURCES = ("attention", "mean_query", "norm")
OPTIONS = ("saliency_source", "vision_layer")  # options of this patch family (not of the method)
QUERY_CHUNK = 1024  # query rows per attention chunk: bounds the [heads, chunk, n] score block in memory


def check_options(model, options: dict[str, Any]) -> None:
    """Refuse a bad ``saliency_source`` or ``vision_layer`` before anything is patched."""
    source = options.get("saliency_source", "attention")
    if source not in SALIENCY_SOURCES:
        raise ValueError(f"saliency_source must be one of {SALIENCY_SOURCES}, got saliency_source={source!r}")
    saliency_layer(model, options.get("vision_layer", -1))


def tokens_to_keep(budget: int | float | None, n_tokens: int, image: int = 0) -> int:
    """Merged tokens image ``image`` keeps: ``budget`` itself (an int), ``max(1, floor(budget * n))`` (a float
    share in (0, 1]), or all (None)."""
    if budget is None:
        return n_tokens
    if isinstance(budget, float):
        return max(1, math.floor(budget * n_tokens))
    if budget > n_tokens:
        raise ValueError(
            f"budget={budget} is larger than the {n_tokens} visual tokens of image {image}; give at most "
            f"{n_tokens}, or a share of each image's tokens as a float (budget=0.25 keeps 25%)"
        )
    return budget


# --------------------------------------------------------------------------------------------------------
# vision side: merged tokens + saliency
# --------------------------------------------------------------------------------------------------------


def saliency_layer(model, vision_layer: int = -1) -> int:
    """The block index the saliency is read at; it must attend over the whole image (Qwen2.5-VL: a block of
    ``fullatt_block_indexes``)."""
    visual = model.model.visual
    depth = len(visual.blocks)
    if (
        isinstance(vision_layer, bool)
        or not isinstance(vision_layer, int)
        or not -depth <= vision_layer < depth
    ):
        raise ValueError(
            f"vision_layer must be an int in [-{depth}, {depth - 1}], got vision_layer={vision_layer!r}"
        )
    layer = vision_layer % depth
    full = getattr(visual, "fullatt_block_indexes", None)
    if full is not None and layer not in full:
        raise ValueError(
            f"vision_layer={vision_layer} (block {layer}) attends within windows only; the saliency needs a "
            f"full-attention block, one of fullatt_block_indexes={list(full)}"
        )
    return layer


def attention_scores(module, hidden, cu_seqlens, position_embeddings, source: str):
    """Saliency ``source`` (``"attention"`` or ``"mean_query"``) of every patch of ``hidden [n, width]`` (the
    normalised input of the vision block whose attention ``module`` is, in tower order) and that block's keys
    averaged over heads ``[n, head_dim]``. Each segment of ``cu_seqlens`` (one image) is scored on its own."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    n = hidden.shape[0]
    q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)  # [n, heads, head_dim]
    score = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):  # one image (its full-attention segment) at a time
        qs, ks = q[s:e].transpose(0, 1).float(), k[s:e].transpose(0, 1).float()  # [heads, m, hd]
        if source == "mean_query":
            probs = torch.softmax(qs.mean(1, keepdim=True) @ ks.transpose(1, 2) * module.scaling, dim=-1)
            score[s:e] = probs.sum((0, 1))
            continue
        for r in range(0, e - s, QUERY_CHUNK):  # received attention, summed over queries and heads
            probs = torch.softmax(qs[:, r : r + QUERY_CHUNK] @ ks.transpose(1, 2) * module.scaling, dim=-1)
            score[s:e] += probs.sum((0, 1))
        score[s:e] /= e - s  # mean over the image's queries
    return score, k.mean(1)


def _window_order(model, grid_thw) -> torch.Tensor | None:
    """Qwen2.5-VL: merged-token index (raster) of each merged slot in the tower's window order; None for
    Qwen2-VL (no reordering)."""
    visual = model.model.visual
    if getattr(visual, "window_size", None) is None:
        return None
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    return index.to(grid_thw.device)


@torch.no_grad()
def vision_features(
    model, pixel_values, grid_thw, vision_layer: int = -1, saliency_source: str = "attention"
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Run the vision tower once; per image: merged tokens ``[N_i, D]`` (what the LLM reads), saliency
    ``[N_i]`` (``saliency_source`` at block ``vision_layer``) and keys ``[N_i, head_dim]`` (VisionZip's merge
    metric: that block's keys, mean over heads and over the token's 2x2 patches)."""
    visual = model.model.visual
    block = visual.blocks[saliency_layer(model, vision_layer)]
    got: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        source = "mean_query" if saliency_source == "norm" else saliency_source  # "norm" only needs the keys
        got["score"], got["keys"] = attention_scores(
            module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"], source
        )

    handle = block.attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        merged = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw).pooler_output
    finally:
        handle.remove()
    unit = visual.spatial_merge_size**2
    score = got["score"].view(-1, unit).sum(1)  # a merged token's saliency: the sum over its patches
    keys = got["keys"].view(-1, unit, got["keys"].shape[-1]).mean(1)
    order = _window_order(model, grid_thw)
    if order is not None:  # tower order -> raster order, as the merger output is put back
        inverse = torch.argsort(order)
        score, keys = score[inverse], keys[inverse]
    if saliency_source == "norm":
        score = merged.float().norm(dim=-1)
    sizes = (grid_thw.prod(-1) // unit).tolist()
    return list(merged.split(sizes)), list(score.split(sizes)), list(keys.split(sizes))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


@torch.no_grad()
def compare_saliency_sources(
    model, pixel_values, grid_thw, share: float = 0.25, vision_layer: int = -1
) -> list:
    """How far the saliency substitutes agree, image by image: for every pair of :data:`SALIENCY_SOURCES`,
    the Spearman rank correlation, the overlap of their top-``share`` tokens, and the overlap of SCOPE's picks
    at that share (Jaccard of the kept sets). Returns one dict per image and pair."""
    from scope.select import select

    got = {s: vision_features(model, pixel_values, grid_thw, vision_layer, s) for s in SALIENCY_SOURCES}
    rows = []
    for i, feats in enumerate(got["attention"][0]):
        k = tokens_to_keep(share, feats.shape[0])
        top = {s: set(got[s][1][i].topk(k).indices.tolist()) for s in SALIENCY_SOURCES}
        picks = {s: set(select(feats, got[s][1][i], k, method="scope").tolist()) for s in SALIENCY_SOURCES}
        for a_i, a in enumerate(SALIENCY_SOURCES):
            for b in SALIENCY_SOURCES[a_i + 1 :]:
                ra, rb = _ranks(got[a][1][i]), _ranks(got[b][1][i])
                rows.append(
                    {
                        "image": i,
                        "pair": f"{a}~{b}",
                        "spearman": float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]),
                        "top_overlap": len(top[a] & top[b]) / k,
                        "scope_jaccard": len(picks[a] & picks[b]) / len(picks[a] | picks[b]),
                    }
                )
    return rows


# --------------------------------------------------------------------------------------------------------
# text side: drop the pruned tokens' slots, keep everyone's original position
# --------------------------------------------------------------------------------------------------------


def keep_mask(input_ids: torch.Tensor, image_token_id: int, kept: list[torch.Tensor], counts: list[int]):
    """``[B, L]`` bool: False at the placeholders of pruned tokens. Image i (in row-major order, as
    ``masked_scatter`` fills them) owns the next ``counts[i]`` placeholders and keeps those at ``kept[i]``."""
    slots = (input_ids == image_token_id).flatten().nonzero()[:, 0]
    if slots.numel() != sum(counts):
        raise ValueError(
            f"input_ids hold {slots.numel()} image tokens but the images need {sum(counts)} "
            f"({len(counts)} images); was the prompt built by the model's processor?"
        )
    keep = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    start = 0
    for idx, n in zip(kept, counts):
        dropped = torch.ones(n, dtype=torch.bool, device=input_ids.device)
        dropped[idx] = False
        keep[slots[start : start + n][dropped]] = False
        start += n
    return keep.view_as(input_ids)


def _pruned_images(model, state: PatchState, pixel_values, grid_thw):
    """Kept merged rows per image and their indices; records the counts in ``state.last``."""
    options = {k: v for k, v in state.options.items() if k not in OPTIONS}
    feats, sal, keys = vision_features(
        model,
        pixel_values,
        grid_thw,
        state.options.get("vision_layer", -1),
        state.options.get("saliency_source", "attention"),
    )
    sizes = [int(f.shape[0]) for f in feats]
    budgets = [tokens_to_keep(state.budget, n, i) for i, n in enumerate(sizes)]
    if get_method(state.method).stage == NONE:
        budgets = sizes
    patches = (grid_thw.prod(-1)).tolist()  # pixel rows per image, for the random method's per-image ids
    pixels = pixel_values.split(patches)
    rows, kept = [], []
    for i, (f, s, k, b) in enumerate(zip(feats, sal, keys, budgets)):
        out = select_rows(f[None], s[None], k[None], b, state.method, options, pixels[i].reshape(1, -1))
        idx, r = out.indices[0], out.features[0]
        if bool((idx < 0).any()):
            raise ValueError(f"method {state.method!r} kept a CLS row (keep_cls); Qwen-VL encoders have none")
        order = idx.argsort()  # rows fill the kept placeholders in sequence order
        kept.append(idx[order])
        rows.append(r[order])
    state.last = {"tokens_per_image": budgets, "indices": kept, "n_tokens": sizes}
    return rows, kept, sizes


def _rope_index(model, call: dict, input_ids, attention_mask):
    if call.get("mm_token_type_ids") is None:
        raise ValueError("scope.patch on Qwen-VL needs mm_token_type_ids (the processor returns them)")
    if call.get("image_grid_thw") is None:
        raise ValueError("scope.patch on Qwen-VL needs image_grid_thw (the processor returns it)")
    return model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=call["mm_token_type_ids"],
        image_grid_thw=call["image_grid_thw"],
        attention_mask=attention_mask,
    )[0]


def _prepare(model, state: PatchState, call: dict[str, Any], for_generate: bool) -> dict[str, Any]:
    """Replace the pixels in ``call`` by the kept merged tokens, drop the pruned tokens' slots from the
    sequence, and pass the unpruned sequence's M-RoPE positions of the slots that stay."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    input_ids = call.get("input_ids")
    if input_ids is None:
        raise ValueError("scope.patch needs input_ids (not inputs_embeds) when pixel_values are given")
    if call.get("pixel_values_videos") is not None:
        raise ValueError("scope.patch prunes images only; videos (pixel_values_videos) are not supported")
    if call.get("mm_encoder_outputs"):
        raise ValueError("pass either pixel_values or mm_encoder_outputs to a patched model, not both")
    mask = call.get("attention_mask")
    positions = _rope_index(model, call, input_ids, mask)  # [3, B, L] of the unpruned sequence
    rows, kept, sizes = _pruned_images(model, state, call.pop("pixel_values"), call.pop("image_grid_thw"))
    keep = keep_mask(input_ids, model.config.image_token_id, kept, sizes)
    if mask is not None:
        keep = keep & mask.bool()  # padding goes too; rows are re-padded on the left below
    src, valid = left_pack(keep)

    def take(x: torch.Tensor, fill) -> torch.Tensor:
        return torch.where(valid, x.gather(1, src), torch.full_like(src, fill, dtype=x.dtype))

    pad = model.config.text_config.pad_token_id
    call["input_ids"] = take(input_ids, pad if pad is not None else 0)
    call["attention_mask"] = valid.long() if (mask is not None or not bool(valid.all())) else None
    call["mm_token_type_ids"] = take(call["mm_token_type_ids"], 0)
    if call.get("labels") is not None:
        call["labels"] = take(call["labels"], -100)
    pos = torch.stack([take(p, 0) for p in positions])  # [3, B, L']: every kept slot's original position
    n_valid = valid.sum(1, keepdim=True)
    model.model.rope_deltas = pos.amax((0, 2))[:, None] + 1 - n_valid  # what get_rope_index would store
    if for_generate:  # generate's layout: compact text positions of the shortened rows first (mask building)
        text = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        pos = torch.cat([text[None], pos])
    call["position_ids"] = pos
    call["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(rows))}
    state.last["llm_input_length"] = int(call["input_ids"].shape[1])
    return call


# --------------------------------------------------------------------------------------------------------
# install / uninstall
# --------------------------------------------------------------------------------------------------------


def _refuse_tower_training(model) -> None:
    if model.training and any(p.requires_grad for p in model.model.visual.parameters()):
        raise RuntimeError(
            "a scope-patched model runs its vision tower without gradients (the tokens are only selected "
            "from); freeze the tower (model.model.visual.requires_grad_(False)) to train the rest, or "
            "scope.unpatch(model) to train the tower"
        )


def _has_image_pixels(call: dict) -> bool:
    pv = call.get("pixel_values")  # images only: a video call runs unpruned
    return pv is not None and pv.numel() > 0


def install(model, state: PatchState) -> None:
    """Wrap ``model.forward`` and ``model.generate`` on the instance (the class stays untouched)."""
    wrap_calls(model, state, _prepare, _has_image_pixels, _refuse_tower_training)
