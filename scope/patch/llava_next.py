"""Pre-LLM visual-token pruning for ``LlavaNextForConditionalGeneration`` (anyres, transformers 5.x).

An image becomes P crops (the base image resized to one crop, then a grid of crops of the high-resolution
version); each crop gives N = (image_size / patch_size)^2 tokens. As in the SCOPE reference code:

- the budget is split equally: every crop keeps ``k = budget // P`` tokens, selected on that crop alone
  (features and CLS saliency of its own tower pass);
- the base crop's kept tokens come first, in raster order;
- then the grid crops' kept tokens, in raster order of the *stitched* high-resolution grid (row by row
  across crops, as LLaVA-NeXT lays them out), selected from the full grid: the letterbox padding that
  transformers' ``unpad_image`` removes is not removed (the reference does not unpad either);
- no ``image_newline`` tokens, unless ``keep_newlines=True``: then one newline follows every stitched
  grid row that kept at least one token (and one follows the base crop when an image has no grid).

"Tokens" therefore means the embeddings that enter the LLM for the image: ``k * P`` (<= budget) by default,
``k * P + kept rows`` with ``keep_newlines``. ``model._scope.last["tokens_per_image"]`` records them.
Unpatched LLaVA-NeXT instead feeds ``N + unpadded grid + one newline per grid row`` tokens.
"""

from __future__ import annotations

import torch

from .llava import select_rows, vision_features
from .state import PatchState

__all__ = ["pruned_image_features", "crop_counts", "placeholder_counts", "grid_order"]


def crop_counts(model, image_sizes: torch.Tensor) -> list[int]:
    """Crops per image (base + grid), as the model's own ``get_image_features`` counts them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [
        image_size_to_num_patches(s, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        for s in image_sizes
    ]


def placeholder_counts(model, image_sizes: torch.Tensor, n_tokens: int, strategy: str) -> list[int]:
    """How many ``<image>`` placeholders the processor wrote per image (what ``pack_image_features`` emits)."""
    dummies = [torch.zeros(p, n_tokens, 1) for p in crop_counts(model, image_sizes)]
    _, lens = model.model.pack_image_features(dummies, image_sizes, strategy, image_newline=torch.zeros(1))
    return [int(x) for x in lens]


def grid_shape(model, image_size) -> tuple[int, int]:
    """(crops down, crops across) of an image's high-resolution grid."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(
        image_size, model.config.image_grid_pinpoints, model.config.vision_config.image_size
    )


def grid_order(idx: torch.Tensor, rows: int, cols: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort kept grid tokens into the stitched raster order.

    idx ``[rows * cols, k]`` token indices within each grid crop (crops in row-major order).
    Returns (permutation of the flattened ``[rows * cols * k]`` tokens, their stitched row index).
    """
    crops, k = idx.shape
    crop = torch.arange(crops, device=idx.device)[:, None].expand(crops, k)
    crop_r, crop_c = crop // cols, crop % cols
    tok_r, tok_c = idx // side, idx % side
    g_row = crop_r * side + tok_r
    g_col = crop_c * side + tok_c
    key = (g_row * (cols * side) + g_col).flatten()
    perm = key.argsort()
    return perm, g_row.flatten()[perm]


def _select_crops(feats, sal, keys, pixel_values, per_image, budget: int, method: str, options: dict) -> dict:
    """Kept indices and rows of every crop of the images to prune: ``budget // crops`` per crop, selected on
    each crop alone, with one selection call per distinct per-crop budget (every image with the same number
    of crops at once). Returns image index -> (indices ``[p, k]``, rows ``[p, k, d]``)."""
    n_tok = feats.shape[1]
    starts = [sum(per_image[:i]) for i in range(len(per_image))]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(per_image):
        if budget >= p * n_tok:
            continue  # keeps the model's own packing
        if budget // p < 1:
            raise ValueError(
                f"budget={budget} is smaller than the {p} crops of image {i}: each crop needs >= 1"
            )
        groups.setdefault(budget // p, []).append(i)
    picked = {}
    for k, images in groups.items():
        crops = [c for i in images for c in range(starts[i], starts[i] + per_image[i])]
        idx, rows = select_rows(
            feats[crops], sal[crops], keys[crops], k, method, options, pixel_values[crops]
        )
        offset = 0
        for i in images:
            picked[i] = (idx[offset : offset + per_image[i]], rows[offset : offset + per_image[i]])
            offset += per_image[i]
    return picked


def _pruned_image(model, idx, rows, image_size, side: int):
    """One image's projected kept tokens: the base crop's first, then the grid's in stitched raster order."""
    proj = model.model.multi_modal_projector(rows)  # [p, k, D]
    if proj.shape[0] == 1:
        return proj[0]
    g_rows, g_cols = grid_shape(model, image_size)
    perm, _ = grid_order(idx[1:], g_rows, g_cols, side)
    return torch.cat([proj[0], proj[1:].reshape(-1, proj.shape[-1])[perm]])


def _with_newlines(feat, idx, p: int, model, image_size, side: int, newline):
    """``keep_newlines``: one newline after the last kept token of every stitched grid row that kept
    something (after the base crop when an image has no grid)."""
    if p == 1:
        return torch.cat([feat, newline[None].to(feat)])
    k = idx.shape[1]
    g_rows, g_cols = grid_shape(model, image_size)
    _, row_of = grid_order(idx[1:], g_rows, g_cols, side)
    base, grid = feat[:k], feat[k:]
    last_in_row = torch.ones_like(row_of, dtype=torch.bool)
    last_in_row[:-1] = row_of[1:] != row_of[:-1]
    pieces, begin = [base], 0
    for end in (last_in_row.nonzero()[:, 0] + 1).tolist():
        pieces += [grid[begin:end], newline[None].to(grid)]
        begin = end
    return torch.cat(pieces)


def pruned_image_features(model, state: PatchState, pixel_values, image_sizes, **vision_kw):
    """Projected kept tokens per image (base first, stitched raster grid) and placeholder counts in/out."""
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT inputs need image_sizes (the processor returns them)")
    strategy = vision_kw.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
    per_image = crop_counts(model, image_sizes)
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([pv[:p] for pv, p in zip(pixel_values, per_image)], dim=0)
    feats, sal, keys = vision_features(model, pixel_values, **vision_kw)
    n_tok = feats.shape[1]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    if side * side != n_tok:
        raise ValueError(
            f"LLaVA-NeXT pruning needs square crops of {side}x{side} tokens, got {n_tok} per crop"
        )
    keep_newlines = bool(state.options.get("keep_newlines", False))
    options = {k: v for k, v in state.options.items() if k != "keep_newlines"}
    budget = state.budget
    newline = model.model.image_newline
    out, counts_out, kept_idx = [], [], []
    start = 0
    picked = _select_crops(feats, sal, keys, pixel_values, per_image, budget, state.method, options)
    for i, p in enumerate(per_image):
        if i in picked:
            idx, rows = picked[i]
            feat_i = _pruned_image(model, idx, rows, image_sizes[i], side)
            if keep_newlines:
                feat_i = _with_newlines(feat_i, idx, p, model, image_sizes[i], side, newline)
        else:  # the budget covers every token: the model's own packing, as unpatched
            proj = model.model.multi_modal_projector(feats[start : start + p])
            packed, _ = model.model.pack_image_features([proj], image_sizes[i : i + 1], strategy, newline)
            idx, feat_i = torch.arange(n_tok, device=proj.device).expand(p, n_tok), packed[0]
        start += p
        out.append(feat_i)
        counts_out.append(feat_i.shape[0])
        kept_idx.append(idx)
    counts_in = placeholder_counts(model, image_sizes, n_tok, strategy)
    state.last = {"tokens_per_image": counts_out, "indices": kept_idx, "crops": per_image, "n_tokens": n_tok}
    return out, counts_in, counts_out
