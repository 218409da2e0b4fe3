"""Bookkeeping of a patched ``forward`` / ``generate`` call that does not depend on the model family.

A pre-LLM patch shortens the prompt (dropped visual placeholders), so it has to read the caller's arguments
by name, keep ``generate``'s length limits meaning what the caller meant, and hand back the caller's own
prompt in front of the new tokens. :mod:`scope.patch.llava` (and so LLaVA-NeXT) and :mod:`scope.patch.qwen2_vl` use these.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["bind_call", "shift_lengths", "restore_prompt", "wrap_calls"]


def bind_call(fn, args, kwargs) -> dict[str, Any]:
    """``fn``'s arguments of the call ``fn(*args, **kwargs)`` as one name -> value dict (``**kwargs`` flattened)."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    out.update(out.pop("kwargs", {}))
    return out


def shift_lengths(call: dict, config, shrink: int) -> None:
    """Keep the stopping rules of unpatched ``generate``: ``max_length`` / ``min_length`` count the prompt,
    which just got ``shrink`` tokens shorter, so they shrink with it unless new-token counts are given (in
    the call or in the generation config)."""
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if call.get(new) is not None or (call.get(total) is None and getattr(config, new, None) is not None):
            continue
        value = call.get(total, getattr(config, total, None))
        if value:
            call[total] = max(0, value - shrink)


def restore_prompt(out, prompt: torch.Tensor, collapsed_len: int):
    """Put the caller's own prompt back in front of the generated tokens (tensor or generate output)."""
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    reps = seq.shape[0] // prompt.shape[0]
    full = torch.cat([prompt.repeat_interleave(reps, 0).to(seq.device), seq[:, collapsed_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


def wrap_calls(
    model,
    state,
    prepare: Callable[..., dict],
    has_pixels: Callable[[dict], bool],
    before_forward: Callable[[Any], None],
) -> None:
    """Wrap ``model.forward`` and ``model.generate`` on the instance (the class stays untouched): a call
    that ``has_pixels`` goes through ``prepare(model, state, call, for_generate)``, which rewrites its
    arguments (pruned visual tokens, shortened ids and mask); ``generate`` keeps the caller's length limits
    and prompt. ``before_forward(model)`` runs first on every forward (e.g. to refuse a trainable tower). The
    replaced instance attributes are kept in ``state.saved`` for the uninstall."""
    for name in ("forward", "generate"):
        state.saved[name] = model.__dict__.get(name)  # an existing instance override (e.g. accelerate)
    orig_forward, orig_generate = model.forward, model.generate

    @functools.wraps(orig_forward)
    def forward(*args, **kwargs):
        before_forward(model)
        call = bind_call(orig_forward, args, kwargs)
        if not has_pixels(call):
            return orig_forward(**call)
        return orig_forward(**prepare(model, state, call, for_generate=False))

    @functools.wraps(orig_generate)
    def generate(inputs=None, generation_config=None, **kwargs):
        if not has_pixels(kwargs):
            return orig_generate(inputs, generation_config=generation_config, **kwargs)
        if inputs is not None:
            kwargs["input_ids"] = inputs
        prompt = kwargs["input_ids"]
        call = prepare(model, state, kwargs, for_generate=True)
        if call.get("attention_mask") is None:
            call.pop("attention_mask")
        shrink = prompt.shape[1] - call["input_ids"].shape[1]
        shift_lengths(call, generation_config or model.generation_config, shrink)
        out = orig_generate(generation_config=generation_config, **call)
        return restore_prompt(out, prompt, call["input_ids"].shape[1])

    model.forward = forward
    model.generate = generate
