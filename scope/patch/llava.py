"""Pre-LLM visual-token pruning for Hugging Face ``LlavaForConditionalGeneration`` (transformers 5.x).

Flow of a patched call (``model(**inputs)`` or ``model.generate(**inputs)``)::

    pixel_values -> vision tower, a pre-hook on layer L's attention recomputes the CLS row
                 -> features F = hidden_states[vision_feature_layer] (CLS dropped), saliency a [n_img, N]
                 -> scope.prune(F, a, budget, method)      kept rows in raster order (VisionZip: merged rows)
                 -> multi_modal_projector(kept rows)       only K rows are projected (a method selecting on
                                                           the projector's output: all N, before prune)
                 -> each image's N <image> placeholders collapsed to K in input_ids / attention_mask
                 -> original forward/generate with mm_encoder_outputs={"image": ...}: the LLM (SDPA) sees K

``L`` is the layer whose *output* is the feature layer (hidden_states[-2] is the output of layer -2), so the
saliency is the CLS-query attention of the same layer the features come from, summed over heads, exactly
what ``output_attentions=True`` would give under eager attention, without switching the tower to eager.

Token accounting: after patching, every image contributes exactly ``min(budget, N)`` tokens to the LLM's
input; ``model._scope.last`` records the counts of the latest call. ``budget >= N`` (or ``method="none"``)
reproduces the unpatched logits exactly.

Positions: ``forward`` numbers the collapsed sequence from the attention mask (compact per row, as
``generate`` and the LLaVA repo do); ``position_ids`` passed together with ``pixel_values`` are replaced,
since the positions of the dropped placeholders no longer exist.

Shapes the caller sees: ``forward`` returns logits for the *collapsed* sequence (length L - n_img (N - K));
``generate`` returns the caller's original prompt ids followed by the new tokens, exactly as unpatched, so
``out[:, inputs.input_ids.shape[1]:]`` still slices off the prompt.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import torch

from scope.methods import NONE, get_method
from scope.select import Pruned, prune

from .cache import cached_vision_features
from .calls import wrap_calls
from .state import PatchState, left_pack

__all__ = ["vision_features", "pixel_ids", "select_rows", "collapse_placeholders", "install", "uninstall"]


# --------------------------------------------------------------------------------------------------------
# vision side: features + CLS saliency of the feature layer
# --------------------------------------------------------------------------------------------------------


def _feature_layer(model, vision_feature_layer, tower=None) -> tuple[int, int]:
    """(hidden_states index, encoder layer index) of the feature layer."""
    layer = model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"scope.patch supports a single vision_feature_layer, got vision_feature_layer={layer!r}"
        )
    layers = _encoder_layers(model, tower)
    h_idx = layer % (len(layers) + 1)  # hidden_states[0] is the embedding output
    if h_idx == 0:
        raise ValueError(f"vision_feature_layer={layer} selects the embeddings, which have no attention")
    return layer, h_idx - 1


def _encoder_layers(model, tower=None):
    tower = model.model.vision_tower if tower is None else tower
    encoder = getattr(tower, "encoder", None) or getattr(
        getattr(tower, "vision_model", None), "encoder", None
    )
    layers = getattr(encoder, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "k_proj"):
        raise ValueError(
            f"scope.patch needs a CLIP-like vision tower (encoder.layers[i].self_attn with q_proj/k_proj); "
            f"got {type(tower).__name__}"
        )
    return layers


@torch.no_grad()
def vision_features(
    model,
    pixel_values: torch.Tensor,
    vision_feature_layer=None,
    vision_feature_select_strategy=None,
    with_cls: bool = False,
    tower=None,
) -> tuple[torch.Tensor, ...]:
    """Run the vision tower once and return ``(features, saliency, keys)`` for every image/crop.

    features ``[n, N, d]``: ``hidden_states[vision_feature_layer]`` (CLS dropped for strategy "default");
    saliency ``[n, N]``: softmax(q_cls k^T / sqrt(d_head)) of that layer summed over heads;
    keys ``[n, N, d_head]``: that layer's attention keys averaged over heads (VisionZip's merge metric);
    ``with_cls=True`` adds a fourth tensor, the CLS token's feature ``[n, d]`` of that layer.
    ``tower``: the CLIP-like tower to run (default ``model.model.vision_tower``; Video-LLaVA has an image and
    a video tower).
    Inside :func:`scope.patch.reuse_vision_features` a batch of pixels seen before is not run again.
    """
    strategy = vision_feature_select_strategy or model.config.vision_feature_select_strategy
    tower = model.model.vision_tower if tower is None else tower
    layer, attn_layer = _feature_layer(model, vision_feature_layer, tower)
    out = cached_vision_features(
        model,
        pixel_values,
        (layer, strategy, id(tower)),
        lambda: _run_tower(tower, pixel_values, layer, attn_layer, strategy),
    )
    return out if with_cls else out[:3]


def _run_tower(tower, pixel_values, layer: int, attn_layer: int, strategy: str):
    attn = _encoder_layers(None, tower)[attn_layer].self_attn
    got: dict[str, torch.Tensor] = {}

    def cls_row(module, args, kwargs):
        # recompute only the CLS query row: [n, H, 1, S] instead of the full [n, H, S, S] eager matrix
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        n, S, _ = h.shape
        heads, hd = module.num_heads, module.head_dim
        q = module.q_proj(h[:, :1]).view(n, 1, heads, hd).transpose(1, 2)
        k = module.k_proj(h).view(n, S, heads, hd).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * module.scale, dim=-1)
        got["saliency"] = probs.sum(1)[:, 0]  # [n, S]
        got["keys"] = k.mean(1)  # [n, S, hd]

    handle = attn.register_forward_pre_hook(cls_row, with_kwargs=True)
    try:
        out = tower(pixel_values, output_hidden_states=layer, return_dict=True)
    finally:
        handle.remove()
    feats, sal, keys = out.hidden_states[layer], got["saliency"], got["keys"]
    cls = feats[:, 0]
    if strategy == "default":
        feats, sal, keys = feats[:, 1:], sal[:, 1:], keys[:, 1:]
    elif strategy != "full":
        raise ValueError(f"unknown vision_feature_select_strategy={strategy!r}")
    return feats, sal, keys, cls


def pixel_ids(pixel_values: torch.Tensor) -> list[int]:
    """One id per image or crop: the CRC-32 of its pixels (the same whatever batch it comes in)."""
    flat = pixel_values.detach().float().cpu().reshape(pixel_values.shape[0], -1).numpy()
    return [zlib.crc32(row.tobytes()) for row in flat]


def select_rows(
    feats: torch.Tensor,
    sal: torch.Tensor | None,
    keys: torch.Tensor | None,
    budget: int,
    method: str,
    options: dict,
    pixels: torch.Tensor | None = None,
    cls: torch.Tensor | None = None,
) -> Pruned:
    """The kept rows of ``feats [n, N, d]`` via ``scope.prune``: :class:`scope.select.Pruned` (indices
    ``[n, K]``, ascending unless the method's options order them otherwise, rows ``[n, K, d]``).

    A method whose record names a ``keys_option`` (VisionZip's merge metric) gets the tower's attention keys
    there unless the caller set it, one naming a ``cls_option`` the CLS features ``cls [n, d]``; one whose
    record names a ``sample_ids_option`` (random) gets one id per row from ``pixels`` (the rows' images or
    crops), so its draw depends on the image and not on the batch. The ids are hashed only for such a method.
    """
    n, N, _ = feats.shape
    record = get_method(method)
    if record.stage == NONE or budget >= N:
        idx = torch.arange(N, device=feats.device).expand(n, N)
        return Pruned(idx, feats)
    opts = dict(options)
    if record.keys_option is not None and opts.get(record.keys_option) is None:
        opts[record.keys_option] = keys
    if record.cls_option is not None and opts.get(record.cls_option) is None:
        opts[record.cls_option] = cls
    if (
        record.sample_ids_option is not None
        and opts.get(record.sample_ids_option) is None
        and pixels is not None
    ):
        opts[record.sample_ids_option] = pixel_ids(pixels)
    out = prune(feats, sal, budget, method, **opts)
    return out._replace(features=out.features.to(feats.dtype))


# --------------------------------------------------------------------------------------------------------
# text side: collapse N placeholders to K
# --------------------------------------------------------------------------------------------------------


def collapse_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    counts_in: list[int],
    counts_out: list[int],
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Drop placeholders so that image i (in input order) keeps ``counts_out[i]`` of its ``counts_in[i]``.

    Images are matched to placeholders in row-major order, exactly as ``masked_scatter`` fills them. Rows
    that lose fewer tokens than the longest-shrinking row are re-padded on the left (mask 0, label -100),
    so the original padding and the left alignment generation needs are both kept.
    """
    B, L = input_ids.shape
    is_img = input_ids == image_token_id
    flat = is_img.flatten().nonzero()[:, 0]
    if flat.numel() != sum(counts_in):
        raise ValueError(
            f"input_ids hold {flat.numel()} image tokens but the images need {sum(counts_in)} "
            f"({len(counts_in)} images); was the prompt built by the model's processor?"
        )
    keep = torch.ones(B * L, dtype=torch.bool, device=input_ids.device)
    start = 0
    for n_in, n_out in zip(counts_in, counts_out):
        keep[flat[start + n_out : start + n_in]] = False
        start += n_in
    keep = keep.view(B, L)
    src, valid = left_pack(keep)  # rows that lose fewer tokens are re-padded on the left

    def take(x: torch.Tensor, fill) -> torch.Tensor:
        return torch.where(valid, x.gather(1, src), torch.full_like(src, fill, dtype=x.dtype))

    mask_in = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    new_mask = take(mask_in, 0)
    out = {
        "input_ids": take(input_ids, pad_token_id),
        "attention_mask": new_mask if (attention_mask is not None or not bool(valid.all())) else None,
        "labels": take(labels, -100) if labels is not None else None,
    }
    return out


def positions_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Compact positions (0 at each row's first real token), as ``generate`` and the LLaVA repo build them."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


# --------------------------------------------------------------------------------------------------------
# LLaVA-1.5: encode, prune, project
# --------------------------------------------------------------------------------------------------------


def pruned_image_features(model, state: PatchState, pixel_values, image_sizes=None, **vision_kw):
    """Projected kept features, one ``[K_i, D]`` tensor per image, and the placeholder counts in/out.

    A method that selects on the projector's output (its record's ``projected``, e.g. DivPrune with
    ``feature_space="projected"`` as the authors run it) gets every token projected first and keeps rows of
    that; the others select on the vision features and only the kept rows are projected.
    """
    feats, sal, keys, cls = vision_features(model, pixel_values, with_cls=True, **vision_kw)
    n_img, N, _ = feats.shape
    budget = N if state.budget is None else state.budget
    projector = model.model.multi_modal_projector
    on_projected = get_method(state.method).selects_projected(state.options)
    if on_projected:
        feats, cls = projector(feats), projector(cls)
    out = select_rows(feats, sal, keys, budget, state.method, state.options, pixel_values, cls)
    projected = out.features if on_projected else projector(out.features)
    idx = out.indices
    state.last = {"tokens_per_image": [idx.shape[1]] * n_img, "indices": idx, "n_tokens": N}
    return list(projected), [N] * n_img, [idx.shape[1]] * n_img


TOWERS = ("vision_tower", "image_tower", "video_tower")  # LLaVA(-NeXT); Video-LLaVA's two towers


def _refuse_tower_training(model) -> None:
    if not model.training:
        return
    for name in TOWERS:
        tower = getattr(model.model, name, None)
        if tower is not None and any(p.requires_grad for p in tower.parameters()):
            raise RuntimeError(
                f"a scope-patched model runs its vision tower without gradients (the features are only "
                f"selected from); freeze the tower (model.model.{name}.requires_grad_(False)) to train the "
                f"rest, or scope.unpatch(model) to train the tower"
            )


def _has_pixels(call: dict) -> bool:
    """Whether a call carries images or videos to prune (an empty tensor counts as none)."""
    return any(
        call.get(k) is not None and call[k].numel() > 0 for k in ("pixel_values", "pixel_values_videos")
    )


def _prepare(model, state: PatchState, call: dict[str, Any], encode, for_generate: bool) -> dict[str, Any]:
    """Replace pixel inputs in ``call`` by pruned ``mm_encoder_outputs`` and collapsed ids/mask."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    input_ids = call.get("input_ids")
    if input_ids is None:
        raise ValueError("scope.patch needs input_ids (not inputs_embeds) when pixel_values are given")
    if call.get("mm_encoder_outputs"):
        raise ValueError("pass either pixel_values or mm_encoder_outputs to a patched model, not both")
    pixel_values = call.pop("pixel_values")
    vision_kw = {
        k: call.pop(k) for k in ("vision_feature_layer", "vision_feature_select_strategy") if k in call
    }
    image_sizes = call.pop("image_sizes", None)
    features, counts_in, counts_out = encode(model, state, pixel_values, image_sizes, **vision_kw)
    pad = model.config.text_config.pad_token_id
    new = collapse_placeholders(
        input_ids,
        call.get("attention_mask"),
        model.config.image_token_id,
        counts_in,
        counts_out,
        labels=call.get("labels"),
        pad_token_id=pad if pad is not None else 0,
    )
    call["input_ids"] = new["input_ids"]
    call["attention_mask"] = new["attention_mask"]
    if call.get("labels") is not None:
        call["labels"] = new["labels"]
    if not for_generate:
        # the original forward would number positions 0..L-1 and ignore padding; after collapsing, rows may
        # be re-padded, so positions come from the mask (identical to arange when nothing is padded)
        call["position_ids"] = positions_from_mask(new["attention_mask"])
    call["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    state.last["llm_input_length"] = int(new["input_ids"].shape[1])
    return call


def install(model, state: PatchState, encode=pruned_image_features, prepare=None) -> None:
    """Wrap ``model.forward`` and ``model.generate`` on the instance (the class stays untouched).

    ``prepare(model, state, call, for_generate)`` rewrites a call's arguments (default: this module's,
    with ``encode`` as the image encoder); :mod:`scope.patch.video_llava` passes its own.
    """
    if prepare is None:
        prepare = functools.partial(_prepare, encode=encode)
    wrap_calls(model, state, prepare, _has_pixels, _refuse_tower_training)


def uninstall(model, state: PatchState) -> None:
    """Restore the instance attributes ``install`` replaced."""
    for name, value in state.saved.items():
        if value is None:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = value
