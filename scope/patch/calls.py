"""Bookkeeping of a patched ``forward`` / ``generate`` call that does not depend on the model family.

A pre-LLM patch shortens the prompt (dropped visual placeholders), so it has to read the caller's arguments
by name, keep ``generate``'s length limits meaning what the caller meant, and hand back the caller's own
prompt in front of the new tokens. :mod:`scope.patch.llava` (and so LLaVA-NeXT) and :mod:`scope.patch.qwen2_vl` use these.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["bind_call", "shift_lengths", "restore_prompt"]


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
