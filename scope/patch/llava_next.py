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
  grid row that kept at least one token (and one follows the base crop when an image has no grid);
- rows that are not grid tokens go after the grid's, as the official VisionZip code feeds them: each grid
  crop's kept CLS token (index -1), then each grid crop's appended rows (``Pruned.n_appended``: VisionZip's
  contextual tokens with ``order="official"``); the base crop keeps its rows in the method's order.

A method that selects on the projector's output (its record's ``projected``: DivPrune with
``feature_space="projected"``) runs as the DivPrune authors' code does instead: every crop is projected
and packed as the unpatched model packs it (base crop, unpadded grid, newline tokens), and one selection
over that sequence keeps ``round(L * budget / (crops * N))`` of its ``L`` rows (the budget's share of the
image's tokens applied to the packed length), in packed order.

"Tokens" therefore means the embeddings that enter the LLM for the image: ``k * P`` (<= budget) by default,
``k * P + kept rows`` with ``keep_newlines``. ``model._scope.last["tokens_per_image"]`` records them.
Unpatched LLaVA-NeXT instead feeds ``N + unpadded grid + one newline per grid row`` tokens.
"""

from __future__ import annotations

import torch

from scope.methods import get_method

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


def _select_crops(feats, sal, keys, cls, pixel_values, per_image, budget: int, method: str, options: dict):
    """Kept indices and rows of every crop of the images to prune: ``budget // crops`` per crop, selected on
    each crop alone, with one selection call per distinct per-crop budget (every image with the same number
    of crops at once). Returns image index -> :class:`scope.select.Pruned` (``[p, k]``, ``[p, k, d]``)."""
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
        out = select_rows(
            feats[crops], sal[crops], keys[crops], k, method, options, pixel_values[crops], cls[crops]
        )
        offset = 0
        for i in images:
            span = slice(offset, offset + per_image[i])
            picked[i] = out._replace(indices=out.indices[span], features=out.features[span])
            offset += per_image[i]
    return picked


def _pruned_image(model, picked, image_size, side: int):
    """One image's projected kept tokens: the base crop's first, then the grid's in stitched raster order,
    then the grid crops' CLS rows and appended rows (see the module's docstring)."""
    proj = model.model.multi_modal_projector(picked.features)  # [p, k, D]
    if proj.shape[0] == 1:
        return proj[0]
    g_rows, g_cols = grid_shape(model, image_size)
    body = proj.shape[1] - picked.n_appended
    grid, idx, D = proj[1:, :body], picked.indices[1:, :body], proj.shape[-1]
    spatial = idx[0] >= 0  # a kept CLS token (index -1) sits at the same row of every crop
    perm, _ = grid_order(idx[:, spatial], g_rows, g_cols, side)
    tail = [grid[:, ~spatial].reshape(-1, D), proj[1:, body:].reshape(-1, D)]
    return torch.cat([proj[0], grid[:, spatial].reshape(-1, D)[perm], *tail])


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
    feats, sal, keys, cls = vision_features(model, pixel_values, with_cls=True, **vision_kw)
    n_tok = feats.shape[1]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    if side * side != n_tok:
        raise ValueError(
            f"LLaVA-NeXT pruning needs square crops of {side}x{side} tokens, got {n_tok} per crop"
        )
    keep_newlines = bool(state.options.get("keep_newlines", False))
    options = {k: v for k, v in state.options.items() if k != "keep_newlines"}
    counts_in = placeholder_counts(model, image_sizes, n_tok, strategy)
    if get_method(state.method).selects_projected(options):
        if keep_newlines:
            raise ValueError("keep_newlines does not apply to a selection over the packed projected tokens")
        return _select_packed(model, state, feats, per_image, image_sizes, strategy, options, counts_in)
    budget = state.budget
    newline = model.model.image_newline
    out, counts_out, kept_idx = [], [], []
    start = 0
    picked = _select_crops(feats, sal, keys, cls, pixel_values, per_image, budget, state.method, options)
    for i, p in enumerate(per_image):
        if i in picked:
            feat_i, idx = _pruned_image(model, picked[i], image_sizes[i], side), picked[i].indices
            if keep_newlines:
                if picked[i].n_appended or bool((idx < 0).any()):
                    raise ValueError(
                        "keep_newlines needs every kept row to be a grid token (no CLS, no appended rows)"
                    )
                feat_i = _with_newlines(feat_i, idx, p, model, image_sizes[i], side, newline)
        else:  # the budget covers every token: the model's own packing, as unpatched
            proj = model.model.multi_modal_projector(feats[start : start + p])
            packed, _ = model.model.pack_image_features([proj], image_sizes[i : i + 1], strategy, newline)
            idx, feat_i = torch.arange(n_tok, device=proj.device).expand(p, n_tok), packed[0]
        start += p
        out.append(feat_i)
        counts_out.append(feat_i.shape[0])
        kept_idx.append(idx)
    state.last = {"tokens_per_image": counts_out, "indices": kept_idx, "crops": per_image, "n_tokens": n_tok}
    return out, counts_in, counts_out


def _select_packed(model, state: PatchState, feats, per_image, image_sizes, strategy, options, counts_in):
    """The DivPrune authors' LLaVA-NeXT selection: project every crop, pack the image as the model does
    (unpadded grid, newline tokens), keep ``round(L * budget / (crops * N))`` of its ``L`` packed rows by one
    selection over them; ``state.last["indices"]`` holds positions in the packed sequence."""
    n_tok = feats.shape[1]
    proj = model.model.multi_modal_projector(feats)
    out, kept_idx, start = [], [], 0
    for i, p in enumerate(per_image):
        packed, _ = model.model.pack_image_features(
            [proj[start : start + p]], image_sizes[i : i + 1], strategy, model.model.image_newline
        )
        rows = packed[0]
        start += p
        k = max(1, round(rows.shape[0] * state.budget / (p * n_tok)))  # select_rows keeps all when k >= L
        kept = select_rows(rows[None], None, None, k, state.method, options)
        out.append(kept.features[0])
        kept_idx.append(kept.indices[0])
    counts_out = [x.shape[0] for x in out]
    state.last = {"tokens_per_image": counts_out, "indices": kept_idx, "crops": per_image, "n_tokens": n_tok}
    return out, counts_in, counts_out
