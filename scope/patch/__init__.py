"""Make a transformers LLaVA model prune visual tokens: ``scope.patch(model, method, budget)``.

    import scope
    scope.patch(model, method="scope", budget=64)      # LlavaForConditionalGeneration / LlavaNext...
    model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
    scope.unpatch(model)                                # back to the original, bit for bit

    with scope.patch(model, method="fastv", budget=64):  # or as a context manager
        model(**inputs)

Methods (the registry, :mod:`scope.methods`, says which is which):
- pre-LLM methods (SCOPE and the selection baselines) prune *before* the LLM (:mod:`scope.patch.llava`,
  :mod:`scope.patch.llava_next`): ``budget`` = tokens per image (LLaVA-NeXT: split over crops); on Qwen2-VL /
  Qwen2.5-VL (:mod:`scope.patch.qwen2_vl`) merged tokens per image, or a float share of each image's tokens,
  each kept token keeping its original M-RoPE position; on Video-LLaVA (:mod:`scope.patch.video_llava`) tokens
  per image, or per video split evenly over its frames;
- the unpruned method ``"none"`` patches nothing in the computation but goes through the same code path
  (a control);
- in-LLM methods (FastV, PDrop) drop visual tokens *inside* the LLM (:mod:`scope.patch.in_llm`):
  ``budget`` = visual tokens per image kept after the (first) pruning layer.

Gradients: the vision tower runs under ``torch.no_grad`` in a pre-LLM patch (its features are only selected
from), so a patched model in training mode with a trainable tower raises instead of training it silently;
the projector and the LLM get gradients as usual.

Patching replaces ``forward``/``generate`` (and for in-LLM methods the decoder layers' ``forward``) on the
*instance*; the class, the weights and the state dict are untouched, and ``unpatch`` deletes the overrides.

Deviations from the reference code (kinredon/SCOPE, FastV, PyramidDrop), all deliberate:

1. Budgets are per image. The SCOPE reference divides the budget by ``images.shape[0]``, i.e. by every
   image (LLaVA-1.5) or crop (LLaVA-NeXT) in the *batch*; with its batch size 1 that equals ours.
2. Saliency is recomputed for the CLS row only by a pre-hook (the reference runs the tower with
   ``output_attentions=True`` in eager mode); equal to eager to float precision (tested).
3. LLaVA-NeXT: per-crop budget ``budget // crops`` and stitched-grid raster order as in the reference; we
   raise instead of silently truncating when ``budget // crops`` exceeds a crop's tokens or is 0, and
   offer ``keep_newlines`` (not in the reference). ``method="none"`` keeps transformers' own packing.
4. ``budget >= N`` on LLaVA-1.5 keeps all tokens (identity) instead of erroring.
5. Left-padded batches: positions are rebuilt from the attention mask after collapsing (compact per row,
   as the LLaVA repo builds them); ``generate`` returns the caller's un-collapsed prompt + new tokens.
6. FastV: ``budget`` = kept visual tokens per image (the reference uses a ratio ``R`` of one image's
   tokens, batch size 1, one contiguous image block); scores are the mean over heads of the last valid
   token's attention at layer K-1 recomputed for that one row (reference: eager ``output_attentions``).
   Kept tokens keep their original positions, as in the reference.
7. PDrop: stage ends 8/16/24 are scaled to the LLM depth (``round(L * x / 32)``); ``budget`` (if given)
   is the count after the first drop and later stages multiply by ``ratio``; ``budget=None`` is the
   reference's ``int(N * ratio ** s)``; ``stages=[(layer, keep), ...]`` sets layers and counts as the
   SCOPE authors ran PDrop† (:data:`scope.methods.PDROP_PRESETS`). Ranking as the reference (layer ``b``'s attention of the last
   prompt token on its pre-drop input, mean over heads), positions renumbered compactly after each drop.
   The reference's training-time query set (tokens before answers) is not implemented (inference only).
8. In-LLM methods: an image is a contiguous run of ``<image>`` tokens (two images written back to back
   without text between them count as one); on LLaVA-NeXT the newline embeddings inside the run are
   ranked like visual tokens (the FastV/PDrop references treat all image features alike).
9. In-LLM methods return logits at the caller's sequence length (dropped rows are zero vectors before the
   LM head); the references return the shortened sequence.
"""

from __future__ import annotations

from typing import Any

from scope.methods import IN_LLM, NONE, get_method, names

from .cache import reuse_vision_features
from .state import PatchState

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "check",
    "method_options",
    "equivalent_tokens",
    "reuse_vision_features",
]

# options of the patch itself (not of the method), by model family
_FAMILY_OPTIONS = {
    "llava": (),
    "llava_next": ("keep_newlines",),
    "qwen2_vl": ("saliency_source", "vision_layer"),  # scope.patch.qwen2_vl.OPTIONS
    "video_llava": ("keep_frame_cls",),  # scope.patch.video_llava.OPTIONS
}


def method_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without those of the patch itself (``keep_newlines``): what the method's function takes."""
    family = {k for keys in _FAMILY_OPTIONS.values() for k in keys}
    return {k: v for k, v in options.items() if k not in family}


class _Handle:
    """Returned by :func:`patch`; ``with scope.patch(...) as model:`` unpatches on exit."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        unpatch(self.model)

    def __repr__(self) -> str:
        s = self.model._scope
        return f"<scope patch method={s.method!r} budget={s.budget} on {type(self.model).__name__}>"


def _family(model) -> str:
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        VideoLlavaForConditionalGeneration,
    )

    if isinstance(model, VideoLlavaForConditionalGeneration):
        return "video_llava"
    if isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)):
        return "qwen2_vl"
    if isinstance(model, LlavaNextForConditionalGeneration):  # check first: not a subclass, but be explicit
        return "llava_next"
    if isinstance(model, LlavaForConditionalGeneration):
        return "llava"
    raise ValueError(
        f"scope.patch supports LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
        f"Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration and "
        f"VideoLlavaForConditionalGeneration, got model of type "
        f"{type(model).__name__}"
    )


def check(model, method: str, budget: int | None = 64, **options: Any):
    """Check :func:`patch`'s arguments for ``model`` without patching; returns the method's registry record.

    Raises ValueError naming the bad value (unknown method or option, invalid option value, bad budget, an
    in-LLM layer beyond this model's depth, an option of the wrong model family).
    """
    return _check(model, _family(model), method, budget, options)


def _check(model, family: str, method: str, budget: int | None, options: dict[str, Any]):
    if not isinstance(method, str):
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(names())}")
    record = get_method(method)
    if family == "qwen2_vl":
        return _check_qwen(model, record, budget, options)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be a positive int, got budget={budget!r}")
    family_opts = [k for k in options if k in _FAMILY_OPTIONS[family]]
    if "keep_newlines" in options and family != "llava_next":
        raise ValueError("option keep_newlines applies to LLaVA-NeXT models only")
    if family_opts and record.stage == IN_LLM:
        raise ValueError(f"option(s) {family_opts} apply to pre-LLM methods, not to {method!r}")
    if family == "video_llava":
        from .video_llava import check_options

        if record.stage == IN_LLM:
            raise ValueError(f"in-LLM method {record.name!r} supports LLaVA models only, not Video-LLaVA")
        check_options(options)
    own = {k: v for k, v in options.items() if k not in family_opts}
    if record.stage == NONE:
        if own:
            raise ValueError(f"method {method!r} takes no options, got {sorted(own)}")
    elif record.stage == IN_LLM:  # the plan checks budget and options against this model's depth
        from .in_llm import stage_plan

        stage_plan(method, budget, model.config.text_config.num_hidden_layers, own)
    else:
        if budget is None:
            raise ValueError(f"method {method!r} needs a budget (visual tokens per image), got None")
        record.check_options(own)
    return record


def _check_qwen(model, record, budget, options: dict[str, Any]):
    from . import qwen2_vl

    if record.stage == IN_LLM:
        raise ValueError(f"in-LLM method {record.name!r} supports LLaVA models only, not Qwen-VL")
    share = isinstance(budget, float) and 0 < budget <= 1
    count = isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1
    if budget is not None and not (share or count):
        raise ValueError(
            f"budget must be a positive int (tokens per image) or a float in (0, 1] (a share of each image's "
            f"tokens), got budget={budget!r}"
        )
    if budget is None and record.stage != NONE:
        raise ValueError(f"method {record.name!r} needs a budget (visual tokens per image), got None")
    qwen2_vl.check_options(model, options)
    own = {k: v for k, v in options.items() if k not in qwen2_vl.OPTIONS}
    if record.stage == NONE:
        if own:
            raise ValueError(f"method {record.name!r} takes no options, got {sorted(own)}")
    else:
        record.check_options(own)
    return record


def patch(model, method: str = "scope", budget: int | None = 64, **options: Any) -> _Handle:
    """Make ``model`` prune visual tokens with ``method`` at ``budget`` tokens per image.

    Args:
        model: a transformers ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration``.
        method: a name in the method registry (``scope.METHODS``): a pre-LLM selection, ``"none"``, or an
            in-LLM method (``"fastv"``, ``"pdrop"``).
        budget: visual tokens per image entering the LLM (pre-LLM methods; LLaVA-NeXT splits it evenly
            over crops) or kept after the pruning layer (FastV / first PDrop stage; ``None`` for PDrop means
            the reference schedule ``ratio * N``).
        **options: the method's options (``alpha``, ``combine``, ``precision``, ``seed``, ``n_contextual``,
            ``order``, ``keep_cls``, ``feature_space`` ...; FastV: ``layer``; PDrop: ``layers``, ``ratio``,
            ``stages``); LLaVA-NeXT also takes ``keep_newlines``. Unknown or invalid options raise here, and
            the model is left as it was. :func:`scope.methods.paper_options` gives the authors' settings.

    Returns:
        a handle usable as a context manager (``with scope.patch(m, ...) as m:``); the model is patched
        in place either way. Patching a patched model replaces the previous patch.
    """
    family = _family(model)
    record = _check(model, family, method, budget, options)
    if is_patched(model):
        unpatch(model)
    if family == "qwen2_vl":
        from . import qwen2_vl

        state = PatchState(record.name, budget, dict(options), family)
        qwen2_vl.install(model, state)
    elif family == "video_llava":
        from . import video_llava

        state = PatchState(record.name, budget, dict(options), family)
        video_llava.install(model, state)
    elif record.stage == IN_LLM:
        from . import in_llm

        state = PatchState(record.name, budget, dict(options), "in_llm")
        in_llm.install(model, state)
    else:
        from . import llava

        state = PatchState(record.name, budget, dict(options), family)
        if family == "llava_next":
            from . import llava_next

            if record.stage != NONE:  # "none" on NeXT keeps the model's own packing (unpad + newlines)
                llava.install(model, state, encode=llava_next.pruned_image_features)
        else:
            llava.install(model, state)
    model._scope = state
    return _Handle(model)


def unpatch(model) -> None:
    """Undo :func:`patch`; a no-op on a model that is not patched."""
    state = model.__dict__.get("_scope")
    if state is None:
        return
    if state.family == "in_llm":
        from . import in_llm

        in_llm.uninstall(model, state)
    elif state.family == "qwen2_vl":
        from . import qwen2_vl

        qwen2_vl.uninstall(model, state)
    else:
        from . import llava

        llava.uninstall(model, state)
    del model.__dict__["_scope"]


def is_patched(model) -> bool:
    """Whether ``model`` currently carries a ``scope.patch``."""
    return "_scope" in model.__dict__


def equivalent_tokens(
    method: str, budget: int | None, n_visual: int, num_layers: int, **options: Any
) -> float:
    """Visual tokens per image averaged over the LLM's layers (how in-LLM methods are compared to pre-LLM ones).

    Pre-LLM methods keep ``min(budget, n_visual)`` in every layer; FastV / PDrop keep all ``n_visual``
    before their pruning layers (the method record's ``tokens_per_layer``).
    """
    return get_method(method).average_tokens(budget, n_visual, num_layers, options)
