"""SparseVLM (Zhang et al., ICML 2025) as an in-LLM baseline on :class:`scope.patch.in_llm.InLLMPatch`.

What the authors' code does (Gumpest/SparseVLMs, ``llava/model/language_model/modelling_sparse_llama.py``,
``score.py`` and ``utils.py``, the fixed-schedule version released with the ICML camera-ready), and what we
run:

1. **Raters**, once per prefill, on the LLM's input embeddings: ``m = softmax_T(V T^T).mean_V`` over the
   image's tokens ``V`` and the text tokens after the image ``T``; the raters are the text tokens with ``m``
   above its mean (:func:`select_raters`).
2. **Rating** at the pruning layers 2 / 6 / 15 of 32 (``pruning_loc``; scaled to the depth as
   ``round(L * x / 32)``): the layer's attention (mean over heads) from each rater to each visual token,
   averaged over the raters. The layer itself runs on every token; its *output* is pruned, so layer
   ``x + 1`` is the first to see fewer tokens (a :class:`Stage` with ``score_layer = x``, ``layer = x + 1``).
   The rows are recomputed from the layer's q / k (:func:`rows_attention`), so the model keeps SDPA.
3. **Keep** the top-``k`` visual tokens of the current ones (``k`` from the schedule), in their order.
4. **Recycle**: of the pruned ones, the ``int(0.3 p) + 1`` best rated are clustered into ``int(m / 10) + 1``
   groups by density-peak clustering (DPC-kNN, ``cluster_and_merge``) and each group's mean hidden state is
   appended after the image's kept tokens (:func:`recycle_pruned`). They count as visual tokens from then on and
   can be rated, kept or pruned again at the next layer.
5. Positions are renumbered compactly after each drop (the authors slice ``position_ids[:, :n]``).

Schedules (``stages=[(layer, k), ...]``, the authors' ``sparse_token_list`` of ``score.py``) for LLaVA-1.5
at 192 / 128 / 64 are :data:`scope.methods.SPARSEVLM_PRESETS`. The authors publish none for LLaVA-NeXT;
without ``stages`` our rule (:func:`sparsevlm_plan`) picks ``k_s = round(n r^(s+1))`` with the largest ``r``
whose layer-averaged count (recycled tokens included), counted as the authors count their presets (below),
is at most the budget. Where the layers before the first drop alone exceed the budget (LLaVA-NeXT at 160 of
2880 tokens: 2 x 2880 / 32 = 180) every stage keeps one token (+ recycled) and the average stays above it.

Token accounting: a layer counts the tokens it computes on, so the rating layer counts the tokens before its
drop (how FastV / PDrop are counted here). The authors' log ("Equal Tokens") counts the rating layer after
its drop, which gives their presets 192.0 / 128.6 / 64.8 visual tokens per layer where ours gives 206.5 /
145.4 / 82.3 on a 576-token image.

Deviations from the authors' code, each named:

- they keep ``min(k, n - 1)`` tokens, so a layer always prunes at least one token (then recycled as a
  one-token cluster at a new position); we keep ``min(k, n)``: ``k >= n`` leaves the sequence unchanged;
- the density tie-break: theirs adds ``rand * 1e-6``, ours breaks ties by the lower index (deterministic);
- distances, softmaxes and merges run in float32 (theirs in the model's dtype);
- batches (their code handles one sample, one image) and several images per row: raters are picked per row
  from every image token of the row and the text after its first image; each image keeps and recycles its
  own tokens; a row without raters (all ``m`` equal) rates with all of that text;
- ``recycle=False`` turns step 4 off (SparseVLM without its token recycling).
"""

from __future__ import annotations

import functools

import torch
from transformers.models.llama.modeling_llama import rotate_half  # RoPE as the Llama layers apply it

from .in_llm import Stage
from .state import left_pack

__all__ = [
    "sparsevlm_plan",
    "select_raters",
    "rows_attention",
    "recycle_pruned",
    "dpc_knn_merge",
    "stage_counts",
    "authors_average",
]

AUTHORS_LAYERS = (2, 6, 15)  # pruning_loc of a 32-layer LLM
MERGE_SHARE = 0.3  # share of the pruned tokens that are recycled (the best rated ones)
CLUSTER_SHARE = 10  # recycled tokens per cluster


def _recycled(pruned: int, recycle: bool) -> int:
    """Clusters appended after pruning ``pruned`` tokens (the authors' ``int(m / 10) + 1``)."""
    if not recycle or pruned <= 0:
        return 0
    merged = int(pruned * MERGE_SHARE) + 1
    return int(merged / CLUSTER_SHARE) + 1


def stage_counts(n: int, tops, recycle: bool = True) -> list[int]:
    """Visual tokens of an ``n``-token image after each stage that keeps ``tops[s]`` (+ recycled clusters)."""
    out, current = [], n
    for top in tops:
        kept = min(current, int(top))
        current = kept + _recycled(current - kept, recycle)
        out.append(current)
    return out


def authors_average(n: int, tops, rating, num_layers: int, recycle: bool = True) -> float:
    """Visual tokens per layer as the authors' log counts them: a rating layer at its count *after* the drop
    (one layer fewer at the previous count than the layers really compute on)."""
    after = stage_counts(n, tops, recycle)
    current, total = n, 0
    for i in range(num_layers):
        if i in rating:
            current = after[list(rating).index(i)]
        total += current
    return total / num_layers


def _geometric_tops(n: int, budget: int, rating: list[int], num_layers: int, recycle: bool) -> tuple:
    """``round(n r^(s+1))`` per stage with the largest ``r`` in [0, 1] whose average, counted as the authors
    count their presets (:func:`authors_average`), is at most ``budget``."""

    def tops(r: float):
        return tuple(max(1, round(n * r ** (s + 1))) for s in range(len(rating)))

    if authors_average(n, tops(1.0), rating, num_layers, recycle) <= budget:
        return tops(1.0)
    lo, hi = 0.0, 1.0  # bisection: the average grows with r
    for _ in range(50):
        mid = (lo + hi) / 2
        below = authors_average(n, tops(mid), rating, num_layers, recycle) <= budget
        lo, hi = (mid, hi) if below else (lo, mid)
    return tops(lo)  # at r = 0 every stage keeps 1 token (+ recycled): the least these layers allow


def sparsevlm_plan(
    budget: int | None, num_layers: int, layers=None, stages=None, recycle: bool = True
) -> list[Stage]:
    """SparseVLM's drop points: rate at ``layers`` (default 2 / 6 / 15 of 32, scaled to the depth), drop
    after each, keep the schedule's top-``k``, recycle a share of the pruned ones.

    ``stages=[(layer, k), ...]``: the rating layers and the top-``k`` kept at each (the authors' lists,
    :data:`scope.methods.SPARSEVLM_PRESETS`); ``budget`` then only names the run. Otherwise ``budget`` is the
    target of the layer-averaged visual tokens (the authors' count) and ``k`` follows
    :func:`_geometric_tops` per image size.
    A Stage's ``keep(n)`` is the count after recycling (what the next layers see).
    """
    if stages is not None:
        if layers is not None:
            raise ValueError(
                f"sparsevlm takes stages or layers, not both (stages={stages!r}, layers={layers!r})"
            )
        pairs = [(int(b), int(k)) for b, k in stages]
    else:
        if budget is None:
            raise ValueError("sparsevlm needs a budget (visual tokens per layer) or stages")
        if layers is None:
            layers = sorted({round(num_layers * x / 32) for x in AUTHORS_LAYERS})
        pairs = [(int(b), None) for b in layers]
    rating = [b for b, _ in pairs]
    if rating != sorted(set(rating)) or rating[0] < 0 or rating[-1] >= num_layers - 1:
        raise ValueError(
            f"sparsevlm rating layers must be increasing in [0, {num_layers - 2}], got {rating!r}"
        )
    firsts = [b + 1 for b in rating]

    @functools.lru_cache(maxsize=64)
    def tops_of(n: int) -> tuple:
        if stages is not None:
            return tuple(k for _, k in pairs)
        return _geometric_tops(n, int(budget), rating, num_layers, recycle)

    def keep(s: int):
        return lambda n: stage_counts(n, tops_of(n), recycle)[s]

    def top(s: int):
        return lambda n: tops_of(n)[s]

    reduce = functools.partial(_reduce, recycle=recycle)
    return [
        Stage(f, b, keep(s), rank=rater_rank, reduce=functools.partial(reduce, top=top(s)))
        for s, (b, f) in enumerate(zip(rating, firsts))
    ]


# --------------------------------------------------------------------------------------------------------
# rating: raters from the embeddings, their attention rows in the rating layer
# --------------------------------------------------------------------------------------------------------


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Which of the ``T`` text embeddings ``text [T, D]`` rate the image ``visual [N, D]``: bool ``[T]``.

    The authors' rule: each visual token's softmax over the text of ``visual @ text^T``, averaged over the
    visual tokens; raters are the text tokens above the mean of that average.
    """
    relevance = (visual.float() @ text.float().T).softmax(-1).mean(0)
    return relevance > relevance.mean()


def _raters(run) -> torch.Tensor:
    """Rater slots ``[B, L0]`` of the caller's sequence (computed once per call, kept in ``run.memo``)."""
    if "raters" in run.memo:
        return run.memo["raters"]
    vis = (run.first_seg >= 0) & run.first_valid
    L = vis.shape[1]
    slots = torch.arange(L, device=vis.device)
    raters = torch.zeros_like(vis)
    for b in range(vis.shape[0]):
        if not vis[b].any():
            continue
        first = int(slots[vis[b]][0])
        text = run.first_valid[b] & ~vis[b] & (slots > first)
        if not text.any():
            continue
        chosen = select_raters(run.embeds[b, vis[b]], run.embeds[b, text])
        if not chosen.any():  # every text token equally relevant: all of them rate
            chosen = torch.ones_like(chosen)
        raters[b, slots[text][chosen]] = True
    run.memo["raters"] = raters
    return raters


@torch.no_grad()
def rows_attention(
    layer, hidden: torch.Tensor, cos_sin, valid: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Head-averaged attention ``[B, R, L]`` of the query slots ``rows`` (bool ``[B, L]``, ``R`` = most per
    row; a row's missing ones are zeros) in ``layer`` given its input, causal and masked to ``valid`` keys.

    Recomputes those query rows with the layer's own norm, projections and RoPE, so the layer keeps SDPA.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    B, L, _ = h.shape
    hd = attn.head_dim
    R = max(int(rows.sum(1).max()), 1)
    order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :R]  # each row's query slots first
    used = torch.arange(R, device=h.device)[None] < rows.sum(1)[:, None]  # [B, R]
    cos, sin = (t.expand(B, -1, -1) for t in cos_sin)
    take = order[..., None].expand(-1, -1, h.shape[-1])
    q = attn.q_proj(h.gather(1, take)).view(B, R, -1, hd).transpose(1, 2)  # [B, H, R, hd]
    qc, qs = (t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]))[:, None] for t in (cos, sin))
    q = q * qc + rotate_half(q) * qs
    k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)  # [B, Hkv, L, hd]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    scores = torch.einsum("bhrd,bhld->bhrl", q.float(), k.float()) * attn.scaling
    slots = torch.arange(L, device=h.device)
    allowed = valid[:, None, :] & (slots[None, None, :] <= order[..., None])  # [B, R, L]
    allowed |= slots[None, None, :] == order[..., None]  # a padding query still sees itself: finite rows
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # [B, R, L]
    return probs * used[..., None]


def rater_rank(layer, hidden: torch.Tensor, cos_sin, run) -> torch.Tensor:
    """Scores ``[B, L]``: each slot's attention from the raters in ``layer``, averaged over raters and heads."""
    ok = run.valid & (run.orig >= 0)
    raters = _raters(run).gather(1, run.orig.clamp(min=0)) & ok & (run.seg < 0)
    probs = rows_attention(layer, hidden, cos_sin, run.valid, raters)
    return probs.sum(1) / raters.sum(1).clamp(min=1)[:, None]


# --------------------------------------------------------------------------------------------------------
# keeping and recycling
# --------------------------------------------------------------------------------------------------------


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak clustering of ``x [m, D]`` into ``clusters`` groups, each merged to its mean.

    The authors' ``cluster_and_merge``: distances ``|x_i - x_j| / sqrt(D)``; density ``exp(-mean of the
    squared distances to the k = clusters nearest)``; each token's distance to the nearest denser token (the
    densest: the largest distance); centres are the top ``clusters`` of density x that distance; every token
    joins its nearest centre. Returns ``(merged [clusters, D], assign [m], centres [clusters])``.
    """
    m, D = x.shape
    if not 1 <= clusters <= m:
        raise ValueError(f"clusters must be in [1, {m}], got clusters={clusters!r}")
    xf = x.float()
    dist = torch.cdist(xf, xf) / D**0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    idx = torch.arange(m, device=x.device)
    # j is denser than i; equal densities: the lower index counts as denser (theirs: random noise)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    gap = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (gap * density).topk(clusters).indices
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(clusters, device=x.device)
    merged = torch.zeros(clusters, D, dtype=torch.float32, device=x.device).index_add_(0, assign, xf)
    merged = merged / torch.bincount(assign, minlength=clusters).clamp(min=1)[:, None]
    return merged.to(x.dtype), assign, centres


def recycle_pruned(
    hidden: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recycle pruned tokens ``hidden [p, D]`` rated ``scores [p]``: the ``int(0.3 p) + 1`` best rated are
    merged into ``int(m / 10) + 1`` clusters. Returns ``(merged [c, D], chosen [m], centres [c])``: which of
    the ``p`` were merged (best first) and, per cluster, the one of them at its centre.
    """
    p = hidden.shape[0]
    m = int(p * MERGE_SHARE) + 1
    chosen = scores.topk(m).indices
    merged, _, centres = dpc_knn_merge(hidden[chosen], _recycled(p, True))
    return merged, chosen, chosen[centres]


def _reduce(run, stage: Stage, scores, hidden, top, recycle: bool):
    """Keep each image's top-``k`` visual slots; write each recycled cluster into its centre's slot and
    order it after the image's kept tokens. Returns the packing ``(src, valid)`` and the hidden states."""
    B, L, _ = hidden.shape
    keep = run.valid & (run.seg < 0)
    key = torch.arange(L, device=hidden.device, dtype=torch.float64).expand(B, L).clone()
    if recycle:
        hidden = hidden.clone()
    for b in range(B):
        for r in range(int(run.n_images[b])):
            cand = (run.seg[b] == r).nonzero()[:, 0]
            if cand.numel() == 0:
                continue
            k = min(cand.numel(), top(int((run.first_seg[b] == r).sum())))
            best = scores[b, cand].topk(k).indices
            keep[b, cand[best]] = True
            pruned = cand[~keep[b, cand]]
            if not recycle or pruned.numel() == 0:
                continue
            merged, _, centres = recycle_pruned(hidden[b, pruned], scores[b, pruned])
            centres = pruned[centres]  # slots of the cluster centres: where the merged tokens live
            hidden[b, centres] = merged
            keep[b, centres] = True
            last = float(cand.max())  # after the image's last slot, in cluster order, before the next text
            step = torch.arange(1, len(centres) + 1, device=key.device, dtype=key.dtype) / (len(centres) + 1)
            key[b, centres] = last + 0.5 * step
    perm = torch.argsort(torch.where(keep, key, torch.inf), dim=1, stable=True)
    src, valid = left_pack(keep.gather(1, perm))
    return perm.gather(1, src), valid, hidden
