"""Pre-LLM visual-token pruning for Video-LLaVA (``VideoLlavaForConditionalGeneration``, transformers 5.x),
through the same ``scope.patch(model, method, budget)``.

Video-LLaVA has two CLIP-like towers (LanguageBind image and video encoders, ViT-L/14 at 224 px) and one
projector. What each modality feeds the LLM, unpruned:

- an image: ``hidden_states[-2]`` of the image tower without the CLS token: 16 x 16 = 256 tokens, exactly
  LLaVA-1.5's path (strategy ``"default"``);
- a video: 8 frames, each run through the video tower on its own, and ``hidden_states[-2]`` of every frame
  *with* its CLS token: 8 x 257 = 2,056 tokens. The original Video-LLaVA code does the same
  (``LanguageBindVideoTower.feature_select`` returns all tokens), so the "2,048 tokens" of the paper's
  Table 3 (and of VisionZip's and FastV's video tables) are 8 x 256 patches; the 8 CLS tokens come on top.

Flow of a patched call (``model(**inputs)`` or ``model.generate(**inputs)``)::

    pixel_values        -> image tower, CLS saliency of layer -2 (scope.patch.llava.pruned_image_features)
                        -> min(budget, 256) rows per image, projected
    pixel_values_videos -> video tower on every frame, CLS saliency of layer -2 over the frame's 256 patches
                        -> per frame: its CLS token + (k - 1) patches picked by the method, k = budget // frames
                        -> projected; each frame's rows in frame order (CLS first, then raster order)
    <image> / <video> placeholders collapsed to the kept counts (scope.patch.llava.collapse_placeholders)
                        -> original forward/generate with mm_encoder_outputs

Budget: tokens per image, or per video split evenly over its frames, ``k = budget // frames`` each (136 ->
17 per frame on 8 frames, as VisionZip's and the paper's Video-LLaVA setting keeps 136 of 2,048). A budget
below the frame count raises; a remainder (``budget % frames``) is not spent, so a video keeps
``frames * k`` tokens (``model._scope.last`` records them). ``budget >= 257 * frames`` (or ``"none"``)
keeps every token and reproduces the unpatched logits exactly.

The frame's CLS token (option ``keep_frame_cls``, default True) is kept and counts towards the frame's k:
the unpruned model sees it in every frame and VisionZip's CLIP path keeps the CLS as its first dominant
token. ``keep_frame_cls=False`` spends all k on patches. VisionZip with ``keep_cls=True`` (its authors'
setting) keeps the CLS through its own option instead (never twice).

Deviation, documented: the per-frame split of the 136 tokens is our reading of VisionZip's video setting
(8 frames x 17). Neither the VisionZip repository (dvlab-research/VisionZip: LLaVA code only) nor the SCOPE
repository (kinredon/SCOPE: LLaVA-1.5 / LLaVA-NeXT only) publishes its Video-LLaVA code, so the exact split
inside a frame (dominant vs contextual for VisionZip, CLS or not) could not be checked against the authors'.

Not supported (clear errors): in-LLM methods (FastV / PDrop), ``inputs_embeds`` without ids, a list of
vision feature layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from scope.methods import NONE, get_method

from .llava import (
    collapse_placeholders,
    positions_from_mask,
    pruned_image_features,
    select_rows,
    uninstall,
    vision_features,
)
from .llava import install as llava_install
from .state import PatchState

__all__ = ["OPTIONS", "check_options", "frame_budget", "pruned_video_features", "install", "uninstall"]

OPTIONS = ("keep_frame_cls",)  # options of this patch family (not of the method)


def check_options(options: dict[str, Any]) -> None:
    """Refuse a bad ``keep_frame_cls`` before anything is patched."""
    value = options.get("keep_frame_cls", True)
    if not isinstance(value, bool):
        raise ValueError(f"keep_frame_cls must be True or False, got keep_frame_cls={value!r}")


def frame_budget(budget: int | None, frames: int, per_frame: int) -> int:
    """Tokens each of a video's ``frames`` frames keeps: ``budget // frames``, at most ``per_frame`` (all of
    a frame's tokens, CLS included); ``None`` keeps all."""
    if budget is None:
        return per_frame
    k = budget // frames
    if k < 1:
        raise ValueError(
            f"budget={budget} is smaller than the {frames} frames of a video it is split over; give at "
            f"least {frames} (one token per frame)"
        )
    return min(k, per_frame)


def _method_options(state: PatchState) -> dict[str, Any]:
    return {k: v for k, v in state.options.items() if k not in OPTIONS}


def pruned_video_features(
    model, state: PatchState, pixel_values_videos: torch.Tensor, vision_feature_layer=None
):
    """Projected kept rows ``[videos * frames, k, D]`` of every frame, and the placeholder counts per video
    (in, out). ``state.last["frame_indices"]`` ``[videos, frames, k]``: the kept positions inside each frame's
    257 tokens (0 = CLS, 1 + i = patch i in raster order)."""
    if pixel_values_videos.ndim != 5:
        raise ValueError(
            f"pixel_values_videos must be [videos, frames, channels, height, width], got shape "
            f"{tuple(pixel_values_videos.shape)}"
        )
    n_videos, n_frames = pixel_values_videos.shape[:2]
    frames = pixel_values_videos.flatten(0, 1)
    tower = model.model.video_tower
    feats, sal, keys, cls = vision_features(model, frames, vision_feature_layer, "full", True, tower)
    n, S, _ = feats.shape  # S = 1 + patches: the frame's CLS token is part of what the LLM reads
    k = frame_budget(state.budget, n_frames, S)
    projector = model.model.multi_modal_projector
    options = _method_options(state)
    record = get_method(state.method)
    if record.stage == NONE or k >= S:
        idx, rows = torch.arange(S, device=feats.device).expand(n, S), projector(feats)
    else:
        own_cls = state.options.get("keep_frame_cls", True) and not options.get("keep_cls", False)
        patches, cls_rows = feats[:, 1:], cls
        on_projected = record.selects_projected(options)
        if on_projected:
            patches, cls_rows = projector(patches), projector(cls)
        k_patches = k - int(own_cls)
        if k_patches > 0:
            out = select_rows(
                patches, sal[:, 1:], keys[:, 1:], k_patches, state.method, options, frames, cls_rows
            )
            idx, rows = out.indices + 1, out.features  # VisionZip's CLS (index -1) lands on 0
        else:  # k = 1 with the CLS kept: the CLS alone
            idx, rows = patches.new_zeros(n, 0, dtype=torch.long), patches[:, :0]
        if own_cls:
            idx = torch.cat([idx.new_zeros(n, 1), idx], 1)
            rows = torch.cat([cls_rows[:, None].to(rows.dtype), rows], 1)
        if not on_projected:
            rows = projector(rows)
    K = idx.shape[1]
    state.last["frame_indices"] = idx.reshape(n_videos, n_frames, K)
    state.last["tokens_per_video"] = [n_frames * K] * n_videos
    state.last["tokens_per_frame"] = S
    return rows, [n_frames * S] * n_videos, [n_frames * K] * n_videos


def _image_rows(model, state: PatchState, pixel_values, vision_kw):
    """LLaVA-1.5's pruned image path on the image tower; rows stacked ``[images, K, D]`` (Video-LLaVA
    scatters a tensor, not a list)."""
    inner = dataclasses.replace(state, options=_method_options(state), last={})
    rows, counts_in, counts_out = pruned_image_features(
        model, inner, pixel_values, None, tower=model.model.image_tower, **vision_kw
    )
    state.last.update(inner.last)
    return torch.stack(rows), counts_in, counts_out


def _prepare(model, state: PatchState, call: dict[str, Any], for_generate: bool) -> dict[str, Any]:
    """Replace the pixels in ``call`` by the kept rows and collapse the placeholders of both modalities."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids = call.get("input_ids")
    if ids is None:
        raise ValueError("scope.patch needs input_ids (not inputs_embeds) when pixel values are given")
    if call.get("mm_encoder_outputs"):
        raise ValueError("pass either pixel values or mm_encoder_outputs to a patched model, not both")
    layer = call.pop("vision_feature_layer", None)
    strategy = call.pop("vision_feature_select_strategy", None)
    images = call.pop("pixel_values", None)
    legacy = call.pop("pixel_values_images", None)  # the deprecated name of pixel_values
    images = legacy if images is None else images
    videos = call.pop("pixel_values_videos", None)
    mask, labels = call.get("attention_mask"), call.get("labels")
    pad = model.config.text_config.pad_token_id
    state.last = {}
    encoded = {}
    for modality, pixels, token_id in (
        ("image", images, model.config.image_token_id),
        ("video", videos, model.config.video_token_id),
    ):
        if pixels is None or pixels.numel() == 0:
            continue
        if modality == "image":
            kw = {"vision_feature_layer": layer, "vision_feature_select_strategy": strategy}
            rows, counts_in, counts_out = _image_rows(model, state, pixels, kw)
        else:
            rows, counts_in, counts_out = pruned_video_features(model, state, pixels, layer)
        new = collapse_placeholders(
            ids, mask, token_id, counts_in, counts_out, labels, pad if pad is not None else 0
        )
        ids, mask, labels = new["input_ids"], new["attention_mask"], new["labels"]
        encoded[modality] = BaseModelOutputWithPooling(pooler_output=rows)
    call["input_ids"], call["attention_mask"] = ids, mask
    if call.get("labels") is not None:
        call["labels"] = labels
    if not for_generate:  # positions of the collapsed (maybe re-padded) rows, as in scope.patch.llava
        call["position_ids"] = positions_from_mask(mask)
    call["mm_encoder_outputs"] = encoded
    state.last["llm_input_length"] = int(ids.shape[1])
    return call


def install(model, state: PatchState) -> None:
    """Wrap ``model.forward`` and ``model.generate`` on the instance (the class stays untouched); undone by
    :func:`uninstall`."""
    llava_install(model, state, prepare=_prepare)
