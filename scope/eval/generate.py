"""Prompts and greedy generation for a batch of questions, with the visual tokens each one fed the LLM."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from scope.eval.video_tasks import video_prompt
from scope.protocol import build_prompt as protocol_prompt
from scope.protocol import get_protocol


def build_prompt(
    processor: Any, question: str, n_images: int = 1, protocol: str = "hf", video: bool = False
) -> str:
    """The prompt for one question with ``n_images`` images in front of it, as ``protocol`` builds it
    (:func:`scope.protocol.build_prompt`: the checkpoint's chat template under "hf", LLaVA's vicuna_v1
    conversation under "paper"); with ``video``, one video in front of it instead
    (:func:`scope.eval.video_tasks.video_prompt`)."""
    if video:
        return video_prompt(processor, question, get_protocol(protocol))
    return protocol_prompt(processor, question, n_images, protocol)


class _StepCounter:
    """A stopping criterion that never stops; it counts generation steps (it is called once per new token).

    The new tokens are then the last ``steps`` columns of generate()'s output, however long the prompt part
    is: a patched model may generate from a collapsed prompt and still return the original one in front.
    """

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _language_model(model: Any):
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", None) or getattr(model, "language_model", None)


@contextlib.contextmanager
def _capture_llm_input(model: Any):
    """Record the attention mask / length of the first (prefill) call of the language model."""
    seen: dict[str, Any] = {}
    lm = _language_model(model)
    if lm is None or not isinstance(lm, torch.nn.Module):
        yield seen
        return

    def hook(module, args, kwargs):
        if "len" not in seen:
            emb = kwargs.get("inputs_embeds")
            mask = kwargs.get("attention_mask")
            seen["len"] = emb.shape[1] if emb is not None else None
            seen["mask"] = (
                mask.detach().sum(-1).cpu() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            )

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _visual_token_ids(model: Any, processor: Any) -> list[int]:
    """The placeholder ids of images (and videos, on Video-LLaVA) in the prompt."""
    tid = getattr(getattr(model, "config", None), "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None) is not None:
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    vid = getattr(getattr(model, "config", None), "video_token_id", None)
    return [t for t in (tid, vid) if t is not None]


@torch.inference_mode()
def generate_answers(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    max_new_tokens: int = 16,
    videos: bool = False,
) -> tuple[list[str], list[int | None]]:
    """Greedy answers for a batch of prompts (left-padded), and the visual tokens each one fed the LLM.

    ``images``: each prompt's images; with ``videos``, each prompt's video as its list of frames (given to
    the processor as ``videos=``).

    The visual-token count is read from the language model's own input: its prefill length (or attention
    mask row) minus the prompt's text tokens, summed over the sample's images. It therefore counts what
    actually entered the LLM, whatever the pruning method did before it; it is None where the model exposes
    no language-model submodule.
    """
    flat = [im for ims in images for im in ims]
    tok = getattr(processor, "tokenizer", processor)
    old_side = getattr(tok, "padding_side", None)
    if old_side is not None:
        tok.padding_side = "left"  # generation continues from the right edge
    try:
        visual = {"videos": [list(v) for v in images]} if videos else {"images": flat or None}
        inputs = processor(text=list(prompts), return_tensors="pt", padding=True, **visual)
    finally:
        if old_side is not None:
            tok.padding_side = old_side
    device = getattr(model, "device", None) or next(model.parameters()).device
    dtype = getattr(model, "dtype", None)
    inputs = {
        k: (v.to(device, dtype) if (v.is_floating_point() and dtype is not None) else v.to(device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in inputs.items()
    }
    from transformers import StoppingCriteriaList

    counter = _StepCounter()
    with _capture_llm_input(model) as seen:
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            stopping_criteria=StoppingCriteriaList([counter]),
            pad_token_id=getattr(tok, "pad_token_id", None),
        )
    new_tokens = out[:, out.shape[1] - counter.steps :]
    texts = [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]

    kept: list[int | None] = [None] * len(prompts)
    tids = _visual_token_ids(model, processor) if seen.get("len") is not None else []
    if tids:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        visual_ids = torch.isin(ids, torch.tensor(tids, device=ids.device))
        n_text = (mask.sum(-1) - (visual_ids & mask.bool()).sum(-1)).cpu()
        # without a mask (generate drops an all-ones one) no row is padded: each fills the prefill length
        lengths = seen["mask"] if seen.get("mask") is not None else torch.full_like(n_text, seen["len"])
        kept = [int(x) for x in (lengths - n_text)]
    return texts, kept
