"""The selections' arithmetic in float16, as the authors' code runs it (``precision="float16"``).

The reference implementations of SCOPE (kinredon/SCOPE, ``scope/clip_encoder.py``, function ``SCOPE``) and
DivPrune (vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``, ``DivPrune``) compute in the model's dtype,
float16 for the released checkpoints. Gains of SCOPE's greedy are sums of hundreds of similarities (around
370 at N = 576, where float16's step is 0.25), so half-precision rounding creates ties and reorders close
candidates: coverage-only, the additive variant and DivPrune pick 5-10% other tokens than in float32.
:mod:`scope.select` computes in float32 by default; these functions repeat the authors' operations in
float16 on any device, so a run can match the paper's picks:

- SCOPE: rows divided by their norm, cosine matrix by one batched product, gains
  ``sum_i max(0, S_ij - c_i)`` summed over the rows ``i`` (the reference's ``.sum(dim=1)``), scores
  ``gain * a ** alpha`` (or ``+``), argmax (ties to the lowest index), ``c`` starting at 0 and raised to the
  pick's row of S. Every step rescores every token: this is the dense loop, whatever ``impl`` says.
- DivPrune: distances ``1 - S`` per image; the first pick maximises the second-smallest distance of its
  column (the smallest is its own), the next ones the smallest distance to the kept tokens.

Sums of float16 tensors accumulate in float32 and round once (PyTorch's rule on CPU and GPU), as in the
reference. Deviation: a token already kept is never picked again (the references rely on its distance
or gain being about 0 and could pick it twice only on duplicate features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["unit_rows_half", "scope_greedy_half", "divprune_half"]

_TINY = 2.0**-24  # the smallest float16 step: a non-zero row's norm is never below it


def unit_rows_half(features: torch.Tensor) -> torch.Tensor:
    """``features / features.norm(dim=-1)`` in float16 (zero rows stay zero instead of NaN)."""
    return F.normalize(features.to(torch.float16), dim=-1, eps=_TINY)


def scope_greedy_half(
    features: torch.Tensor,
    saliency: torch.Tensor | None,
    budget: int,
    alpha: float = 1.0,
    combine: str = "mul",
) -> torch.Tensor:
    """SCOPE's greedy in float16 on ``features [B, N, d]`` and ``saliency [B, N]``: picks ``[B, K]`` ascending."""
    unit = unit_rows_half(features)
    sim = torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N], one product as the reference
    B, N, _ = sim.shape
    rows = torch.arange(B, device=sim.device)
    if saliency is None:
        weight = torch.ones(B, N, dtype=torch.float16, device=sim.device)
    else:
        weight = saliency.to(torch.float16) ** float(alpha)
    cover = torch.zeros(B, N, dtype=torch.float16, device=sim.device)
    taken = torch.zeros(B, N, dtype=torch.bool, device=sim.device)
    picks = []
    for _ in range(budget):
        gain = (sim - cover[:, :, None]).clamp_(min=0).sum(1)  # column j: sum over rows i
        score = gain * weight if combine == "mul" else gain + weight
        v = score.masked_fill_(taken, float("-inf")).argmax(-1)
        picks.append(v)
        taken[rows, v] = True
        cover = torch.maximum(cover, sim[rows, v])
    return torch.stack(picks, -1).sort(-1).values


def divprune_half(features: torch.Tensor, budget: int) -> torch.Tensor:
    """DivPrune's max-min greedy in float16 on ``features [B, N, d]`` (one image at a time, as the reference):
    picks ``[B, K]`` ascending."""
    out = []
    for x in features:
        unit = unit_rows_half(x)
        dist = 1.0 - unit @ unit.t()  # [N, N] float16
        if dist.shape[0] == 1:
            out.append(torch.zeros(1, dtype=torch.long, device=x.device))
            continue
        score = dist.topk(2, dim=0, largest=False).values[1]  # each column's nearest other token
        picked = torch.zeros(dist.shape[0], dtype=torch.bool, device=x.device)
        nearest = None
        picks = []
        for _ in range(budget):
            v = score.masked_fill(picked, float("-inf")).argmax()
            picks.append(v)
            picked[v] = True
            nearest = dist[v] if nearest is None else torch.minimum(nearest, dist[v])
            score = nearest
        out.append(torch.stack(picks).sort().values)
    return torch.stack(out)
