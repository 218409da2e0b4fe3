"""What a patch leaves on a model (``model._scope``), and the row packing both patch paths share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PatchState", "left_pack"]


@dataclass
class PatchState:
    """What ``scope.patch`` attached to a model (``model._scope``).

    method / budget / options: as the caller passed them (options without defaults filled in).
    family: ``"llava"`` or ``"llava_next"`` for pre-LLM methods and ``"none"``, ``"in_llm"`` for FastV / PDrop.
    saved: what ``unpatch`` restores; last: token counts (and kept indices) of the latest call.
    """

    method: str
    budget: int | None
    options: dict[str, Any]
    family: str
    saved: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)


def left_pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the kept slots of every row to the right end of a shorter row (left padding, order kept).

    keep ``[B, L]`` bool. Returns ``(src, valid)``, both ``[B, L']`` with ``L' = max kept per row``: slot s of
    row b holds the ``src[b, s]``-th slot of the input when ``valid[b, s]``, and is padding otherwise (its
    ``src`` then points at the row's first kept slot, a safe gather index).
    """
    lengths = keep.sum(1)
    new_len = int(lengths.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept slots first, in order
    slots = torch.arange(new_len, device=keep.device)
    rank = slots[None, :] - (new_len - lengths)[:, None]
    valid = rank >= 0
    return order.gather(1, rank.clamp(min=0)), valid
