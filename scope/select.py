"""Visual-token selection on plain tensors: SCOPE and the pre-LLM baselines it is compared with.

Everything here takes features ``[B, N, d]`` (or ``[N, d]``) and, where a method needs it, a saliency
``[B, N]`` (or ``[N]``), and returns the indices of the ``K`` kept tokens in ascending (raster) order.
No model code lives here; see :mod:`scope.patch` for the LLaVA integration.

SCOPE (Deng et al., NeurIPS 2025) greedily maximises facility-location coverage weighted by saliency::

    S_uv  = cos(f_u, f_v)                      # token similarity
    c_u   = max_{t in T} S_ut  (0 for T = {})  # how well token u is already covered
    gain  = sum_u max(0, S_uv - c_u)           # coverage gain of adding v
    score = gain * a_v ** alpha                # (or gain + a_v ** alpha with combine="add")

Two implementations pick the same tokens: :func:`scope_greedy_reference` mirrors Algorithm 1 line by line
(O(K N^2)); :func:`scope_greedy_fast` is a *lazy* greedy. Facility-location gains only shrink as the
covered set grows and the saliency factor is fixed, so a stale score is an upper bound of the current one;
each step rescores only the few candidates whose bound could still win.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .half import divprune_half, scope_greedy_half
from .methods import PRE_LLM, get_method, names

__all__ = [
    "Pruned", "prune", "select", "cosine_similarity_matrix", "scope_greedy_reference", "scope_greedy_fast",
    "scope_greedy_dense", "select_scope", "select_coverage", "select_saliency", "select_random",
    "select_uniform", "select_divprune", "merge_visionzip", "visionzip_counts", "uniform_indices",
]  # fmt: skip


class Pruned(NamedTuple):
    """What enters the projector after pruning.

    indices: ``LongTensor[B, K]``, ascending: which of the N tokens the output rows stand for (VisionZip:
        -1 for a kept CLS token, and with ``order="official"`` the order it feeds the rows in).
    features: ``Tensor[B, K, d]``, in the order of ``indices``. For selection methods this is a gather of
        the kept rows; for VisionZip the contextual rows are merged features.
    n_appended: how many last rows are fed after the spatial ones (VisionZip's contextual rows, "official").
    """

    indices: torch.Tensor
    features: torch.Tensor
    n_appended: int = 0


# --------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precision loses the small gain differences the greedy compares: compute in fp32 (fp64 stays)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} contains NaN or inf (first at index {where}, value {x[where].item()})")


def _prepare(
    features: torch.Tensor, saliency: torch.Tensor | None, budget: int
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Validate and batch the inputs. Returns (features [B,N,d] fp32/64, saliency [B,N] or None, unbatched)."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be [N, d] or [B, N, d], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got dtype {features.dtype}")
    unbatched = features.dim() == 2
    feats = features.unsqueeze(0) if unbatched else features
    B, N, d = feats.shape
    if B == 0:
        raise ValueError(f"features has no samples (B = 0), shape {tuple(features.shape)}")
    if N == 0:
        raise ValueError("features has no tokens (N = 0)")
    if d == 0:
        raise ValueError(f"features have no dimensions (d = 0), shape {tuple(features.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, int):
        if isinstance(budget, float) and budget.is_integer():
            budget = int(budget)
        else:
            raise ValueError(f"budget must be an int, got {budget!r}")
    if budget <= 0 or budget > N:
        raise ValueError(f"budget must be in [1, N={N}], got budget={budget}")
    _check_finite("features", feats)
    sal = None
    if saliency is not None:
        if not isinstance(saliency, torch.Tensor):
            raise ValueError(f"saliency must be a torch.Tensor or None, got {type(saliency).__name__}")
        sal = saliency.unsqueeze(0) if saliency.dim() == 1 else saliency
        if tuple(sal.shape) != (B, N):
            raise ValueError(
                f"saliency shape {tuple(saliency.shape)} does not match features shape "
                f"{tuple(features.shape)} (expected {(N,) if unbatched else (B, N)})"
            )
        _check_finite("saliency", sal)
        sal = sal.to(device=feats.device, dtype=compute_dtype(feats.dtype))
    return feats.to(compute_dtype(feats.dtype)), sal, unbatched


def _need_saliency(method: str, saliency: torch.Tensor | None) -> torch.Tensor:
    if saliency is None:
        raise ValueError(f"method={method!r} needs a saliency tensor (CLS attention), got saliency=None")
    return saliency


def _capturing(x: torch.Tensor) -> bool:
    # inside CUDA-graph capture nothing may be read back: the checks that need a value are skipped there
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _powered_saliency(saliency: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha != 0 and not _capturing(saliency) and bool((saliency < 0).any()):
        raise ValueError(
            f"saliency must be non-negative for saliency ** alpha (alpha={alpha}), min value is "
            f"{saliency.min().item()}"
        )
    return saliency.pow(alpha)


# --------------------------------------------------------------------------------------------------------
# SCOPE
# --------------------------------------------------------------------------------------------------------


def cosine_similarity_matrix(features: torch.Tensor, block: int = 144) -> torch.Tensor:
    """Cosine similarity ``[..., N, N]`` of the rows of ``features [..., N, d]``.

    Zero-norm rows get similarity 0 to everything (no NaN). Above ``block`` tokens only the upper triangle
    is multiplied, as row panels of about ``block`` rows (one product ``X[i:e] @ X[i:].T`` each), and the
    rest is mirrored: N = 2880 takes 20 panels of 144 rows, 52.5% of the work of the full product.
    Both greedy implementations call this function (per sample), so they read the same numbers whatever
    the rounding of the product.
    """
    unit = F.normalize(features, dim=-1, eps=1e-12)
    n = unit.shape[-2]
    if n <= block:
        return unit @ unit.transpose(-1, -2)
    parts = math.ceil(n / block)
    ends = [n * p // parts for p in range(parts + 1)]  # panel sizes differ by at most one row
    sim = unit.new_empty(*unit.shape[:-2], n, n)
    for i, e in zip(ends[:-1], ends[1:]):
        sim[..., i:e, i:] = unit[..., i:e, :] @ unit[..., i:, :].transpose(-1, -2)
        if e < n:
            sim[..., e:, i:e] = sim[..., i:e, e:].transpose(-1, -2)
    return sim


def _row_gains(rows: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Coverage gain of each candidate v given its similarity row S[v, :]: sum_u max(0, S_vu - c_u).

    Both SCOPE implementations add the same numbers in the same order: the reference and the batched lazy
    loop call this function, the one-sample lazy loop :func:`_gains_into`, which does its operations in
    place on a work buffer.
    """
    return (rows - cover.unsqueeze(-2)).clamp_(min=0).sum(-1)


def _combine(gain: torch.Tensor, weight: torch.Tensor, combine: str) -> torch.Tensor:
    return gain * weight if combine == "mul" else gain + weight


def _scope_weight(saliency, shape, like, alpha, combine):
    if combine not in ("mul", "add"):
        raise ValueError(f"combine must be 'mul' or 'add', got {combine!r}")
    if isinstance(alpha, bool) or not math.isfinite(float(alpha)) or float(alpha) < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got alpha={alpha!r}")
    if alpha == 0 or saliency is None:
        if saliency is None and alpha != 0:
            raise ValueError(f"SCOPE with alpha={alpha} needs saliency; pass saliency or use alpha=0")
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    return _powered_saliency(saliency, float(alpha))


def scope_greedy_reference(
    features: torch.Tensor,
    saliency: torch.Tensor | None,
    budget: int,
    alpha: float = 1.0,
    combine: str = "mul",
) -> torch.Tensor:
    """Algorithm 1 of the paper, written to be read. Inputs already batched: [B,N,d], [B,N] -> [B,K].

    For every sample: start with nothing covered; K times, score every unselected token by its coverage
    gain times its saliency**alpha, take the best (first index on ties, as ``torch.argmax``), and raise
    the coverage of every token to its similarity with the new pick.
    """
    B, N, _ = features.shape
    weight = _scope_weight(saliency, (B, N), features, alpha, combine)
    sims = [cosine_similarity_matrix(features[b])[None] for b in range(B)]  # S_uv, one sample at a time
    return torch.cat([greedy_steps(sims[b], weight[b : b + 1], budget, combine) for b in range(B)])


def greedy_steps(sim: torch.Tensor, weight: torch.Tensor, budget: int, combine: str = "mul") -> torch.Tensor:
    """Algorithm 1's loop on ``sim [B, N, N]`` and ``weight [B, N]``, every sample at once: start with nothing
    covered; K times, score every unselected token by its coverage gain combined with its weight, take the
    best (first index on ties, as ``torch.argmax``) and raise every token's coverage to its similarity with
    the pick. Returns the picks ``[B, K]`` ascending. Nothing is read back from the device."""
    B, N, _ = sim.shape
    rows = torch.arange(B, device=sim.device)
    cover = torch.zeros(B, N, dtype=sim.dtype, device=sim.device)  # c_u, nothing covered yet
    taken = torch.zeros(B, N, dtype=torch.bool, device=sim.device)
    picks = []
    for _ in range(budget):
        score = _combine(_row_gains(sim, cover), weight, combine).masked_fill_(taken, float("-inf"))
        v = score.argmax(-1)  # [B]: Delta(v; T) * a_v ** alpha at its best
        picks.append(v)
        taken[rows, v] = True
        cover = torch.maximum(cover, sim[rows, v])
    return torch.stack(picks, -1).sort(-1).values


def scope_greedy_fast(
    features: torch.Tensor,
    saliency: torch.Tensor | None,
    budget: int,
    alpha: float = 1.0,
    combine: str = "mul",
    candidates: int = 8,
    dense_limit: int | None = None,
    batched: bool | None = None,
) -> torch.Tensor:
    """Exact SCOPE by lazy greedy; same picks as :func:`scope_greedy_reference`.

    Keeps an upper bound of every token's score (its last exactly computed score; gains only shrink).
    Each step rescores the ``candidates`` tokens with the highest bounds and accepts the best exact score
    if it beats the next bound. Where it does not, every token whose bound still reaches the best score is
    rescored, so ties go to the lowest index as in the reference. Rows are rescored in chunks through one
    small work buffer, with the operations of :func:`_row_gains` done in place.

    ``batched=False`` (the default on CPU) runs the samples one after the other, each with its own
    similarity matrix (the reference's call) and a loop of about a dozen tensor operations per step: on
    CPU it takes 1.5-2.5x less time than the batched loop at N = 2880, B = 8 and about 10% more at
    N = 576, B = 8;
    ``batched=True`` (the default on other devices, where a kernel launch costs more than a row) runs all
    samples in one loop on a ``[B, N, N]`` matrix: when bounds go stale together (near-uniform saliency
    on unstructured features) and a step had to rescore a quarter of the tokens, the next steps of that
    sample rescore all tokens at once, as the reference does.
    Small problems go to the reference loop, where one pass over the matrix costs less than the
    bookkeeping of a lazy step: ``N * N <= dense_limit`` per sample (default ``2**18``: N <= 512; one
    576-token image is already faster lazy), ``B * N * N <= dense_limit`` when batched (default ``2**20``).
    """
    B, N, _ = features.shape
    if batched is None:
        batched = features.device.type != "cpu"
    if dense_limit is None:
        dense_limit = 2**20 if batched else 2**18
    if (B if batched else 1) * N * N <= dense_limit:
        return scope_greedy_reference(features, saliency, budget, alpha=alpha, combine=combine)
    weight = _scope_weight(saliency, (B, N), features, alpha, combine)
    if B == 1 or not batched:
        return torch.stack(
            [
                _lazy_greedy_single(
                    cosine_similarity_matrix(features[b]), weight[b], budget, combine, candidates
                )
                for b in range(B)
            ]
        )
    # per-sample matrices, as the reference computes them: a batched product may round differently
    sim = torch.stack([cosine_similarity_matrix(f) for f in features])
    return _lazy_greedy_batched(sim, weight, budget, combine, candidates)


def _lazy_greedy_single(sim, weight, budget: int, combine: str, candidates: int = 8) -> torch.Tensor:
    """The lazy greedy of :func:`scope_greedy_fast` for one sample ``sim [N, N]``, bookkeeping in Python.

    Per step it issues about a dozen tensor operations (the batched loop needs twenty and more), which
    matters when a step's arithmetic takes microseconds.
    """
    N = sim.shape[0]
    buf = _work_buffer(sim)
    cover = torch.zeros(N, dtype=sim.dtype, device=sim.device)
    bound = _combine(_gains_into(buf, sim, cover), weight, combine)  # exact for T = {}
    m = max(2, min(candidates, N - 1))
    picks: list[int] = []
    for step in range(budget):
        if step == 0 or N - step <= m + 1:
            v = int(bound.argmax())
        else:
            top_val, cand = bound.topk(m + 1)  # more than m + 1 tokens left: no picked token among them
            cand = cand[:m]
            exact = _combine(_gains_into(buf, sim, cover, cand), weight.index_select(0, cand), combine)
            bound.index_copy_(0, cand, exact)
            ex, ci = exact.tolist(), cand.tolist()
            best_val = max(ex)
            v = min(c for c, e in zip(ci, ex) if e == best_val)  # the lowest index among equal scores
            if not best_val > top_val.tolist()[m]:  # an unscored bound still reaches it: settle exactly
                v, _ = _settle(sim, cover, weight, bound, best_val, combine, buf)
        picks.append(v)
        bound[v] = -torch.inf
        cover = torch.maximum(cover, sim[v], out=cover)
        if step + 1 < budget and N - step - 1 <= m + 1:
            bound = _combine(_gains_into(buf, sim, cover), weight, combine).index_fill_(
                0, torch.tensor(picks, device=sim.device), -torch.inf
            )
    return torch.tensor(sorted(picks), dtype=torch.long, device=sim.device)


def _lazy_greedy_batched(sim, weight, budget: int, combine: str, candidates: int = 8) -> torch.Tensor:
    """The lazy greedy of :func:`scope_greedy_fast` for all samples of ``sim [B, N, N]`` in one loop."""
    B, N, _ = sim.shape
    device = sim.device
    buf = _work_buffer(sim)
    cover = torch.zeros(B, N, dtype=sim.dtype, device=device)
    picked = torch.zeros(B, N, dtype=torch.bool, device=device)
    bound = torch.empty(B, N, dtype=sim.dtype, device=device)
    rows_b = torch.arange(B, device=device)
    flat = sim.view(B * N, N)  # row (b, v) of sim is row b * N + v: index_select copies rows fast
    m = max(2, min(candidates, N - 1))  # >= 2 rows per call keeps the reduction kernel (and its order) fixed
    m_min, m_max = m, max(m, min(N - 1, 256))
    offsets = rows_b * N
    dense_left = [0] * B  # per sample: dense steps still to do
    picks = torch.empty(B, budget, dtype=torch.long, device=device)

    for step in range(budget):
        if step == 0 or N - step <= m + 1 or min(dense_left) > 0:
            # exact scores of every token: the first step, the last few, and stretches of stale bounds
            bound = _combine(_row_gains(sim, cover), weight, combine).masked_fill_(picked, -torch.inf)
            best = bound.argmax(-1)
            dense_left = [d - 1 for d in dense_left]
        else:
            top_val, cand = bound.topk(m + 1, dim=-1)  # m candidates + the best bound left out
            cand, next_bound = cand[:, :m], top_val[:, m]
            # more than m + 1 tokens are left, all with finite bounds: no picked token is a candidate
            rows = flat.index_select(0, (cand + offsets[:, None]).flatten()).view(B, m, N)
            exact = _combine(_row_gains(rows, cover), weight.gather(1, cand), combine)
            bound.scatter_(1, cand, exact)
            best_val = exact.max(-1).values
            best = torch.where(exact == best_val[:, None], cand, N).min(-1).values  # lowest index on ties
            unsettled = set((best_val <= next_bound).nonzero().flatten().tolist())
            for b in range(B):
                if dense_left[b] > 0:  # this sample rescores everything for a while
                    bound[b] = _combine(_row_gains(sim[b], cover[b]), weight[b], combine).masked_fill_(
                        picked[b], -torch.inf
                    )
                    best[b] = bound[b].argmax()
                    dense_left[b] -= 1
                elif b in unsettled:
                    best[b], n = _settle(
                        sim[b], cover[b], weight[b], bound[b], float(best_val[b]), combine, buf
                    )
                    if (m + n) * 4 > N:  # its bounds go stale together: a few dense steps are cheaper
                        dense_left[b] = 8
            # bounds that go stale together need a wider first look
            m = min(m_max, 2 * m) if unsettled else max(m_min, (3 * m) // 4)
        picks[:, step] = best
        picked.scatter_(1, best[:, None], True)
        bound.scatter_(1, best[:, None], -torch.inf)
        cover = torch.maximum(cover, flat.index_select(0, best + offsets))
    return picks.sort(-1).values


def _settle(sim, cover, weight, bound, best_val: float, combine, buf) -> tuple[int, int]:
    """Exact argmax for one sample whose bounds still reach ``best_val``, the best exact score so far.

    ``bound`` holds exact scores for the tokens already rescored this step and upper bounds for the rest.
    Rescoring every token whose bound reaches ``best_val`` settles the step in one round: every token left
    out has a bound, hence a score, below it, and so below the new best; the tokens just rescored include
    all that can tie, so the lowest index among the best is the reference's argmax. Updates ``bound``;
    returns the pick and how many rows were rescored.
    """
    idx = (bound >= best_val).nonzero().flatten()  # ascending
    exact = _combine(_gains_into(buf, sim, cover, idx), weight.index_select(0, idx), combine)
    bound.index_copy_(0, idx, exact)
    ex = exact.tolist()
    return int(idx[ex.index(max(ex))]), len(ex)  # first occurrence: the lowest index


def _work_buffer(sim: torch.Tensor) -> torch.Tensor:
    """Rows for :func:`_gains_into`: on CPU about 2 MiB (fp32; N = 2880: 182 rows), which stays in cache
    between the in-place operations; elsewhere all N rows."""
    N = sim.shape[-1]
    rows = N if sim.device.type != "cpu" else min(N, _CHUNK_ELEMENTS // N)
    return sim.new_empty(max(4, rows), N)


_CHUNK_ELEMENTS = 2**19


def _gains_into(buf: torch.Tensor, sim: torch.Tensor, cover: torch.Tensor, idx=None) -> torch.Tensor:
    """``_row_gains(sim[idx], cover)`` (every row of ``sim [N, N]`` when idx is None), bit for bit.

    The rows pass through ``buf [R, N]`` in chunks of at most R rows, with _row_gains's subtraction, clamp
    and row sum done in place: no [n, N] temporaries (a fresh large one costs page faults), and a chunk
    stays in cache between the operations. Every chunk has at least 2 rows (R >= 4 and chunks are
    balanced; one index is doubled): a 1-row sum can take another reduction path than the reference's.
    """
    n = sim.shape[0] if idx is None else idx.numel()
    if idx is not None and n == 1:
        return _gains_into(buf, sim, cover, idx.repeat(2))[:1]
    parts = -(-n // buf.shape[0])
    if parts == 1:
        ends = [0, n]
        out = None
    else:
        ends = [n * i // parts for i in range(parts + 1)]  # sizes differ by at most 1, all >= 2
        out = buf.new_empty(n)
    for s, e in zip(ends[:-1], ends[1:]):
        w = buf[: e - s]
        if idx is None:
            torch.sub(sim[s:e], cover, out=w)
        else:
            torch.index_select(sim, 0, idx[s:e], out=w).sub_(cover)
        if out is None:
            return w.clamp_(min=0).sum(-1)
        torch.sum(w.clamp_(min=0), -1, out=out[s:e])
    return out


def scope_greedy_dense(
    features, saliency, budget: int, alpha: float = 1.0, combine: str = "mul"
) -> torch.Tensor:
    """The reference's arithmetic for all samples at once (:func:`greedy_steps` on every sample's similarity
    matrix), with no host synchronisation: every step rescores every token of every sample on the device
    (``[B, N, N]`` work per step), so the picks are the reference's and a CUDA graph can capture the loop.
    On CPU the lazy greedy is faster; this is the GPU path (``impl="auto"`` there). The one value read back
    is the input check that saliency is non-negative, skipped while a CUDA graph is being captured."""
    B, N, _ = features.shape
    weight = _scope_weight(saliency, (B, N), features, alpha, combine)
    sim = torch.stack([cosine_similarity_matrix(f) for f in features])  # per sample, as the reference
    return greedy_steps(sim, weight, budget, combine)


def select_scope(features, saliency, budget, alpha=1.0, combine="mul", impl="auto", precision="float32"):
    """SCOPE with ``impl``: "fast" (lazy greedy), "reference" (Algorithm 1), "dense" (sync-free, batched)
    or "auto" (dense on CUDA, fast elsewhere). All pick the same tokens. ``precision="float16"``: the
    authors' half-precision arithmetic instead (:func:`scope.half.scope_greedy_half`, dense whatever ``impl``)."""
    if precision == "float16":
        _scope_weight(saliency, features.shape[:2], features, alpha, combine)  # the same input checks
        return scope_greedy_half(features, None if alpha == 0 else saliency, budget, alpha, combine)
    if impl == "auto":
        impl = "dense" if features.device.type == "cuda" else "fast"
    greedy = {"fast": scope_greedy_fast, "reference": scope_greedy_reference, "dense": scope_greedy_dense}
    if impl not in greedy:
        raise ValueError(f"impl must be one of {['auto', *greedy]}, got {impl!r}")
    return greedy[impl](features, saliency, budget, alpha=alpha, combine=combine)


def select_coverage(features, saliency, budget, impl: str = "auto", precision: str = "float32"):
    """SCOPE with alpha = 0: pure facility-location coverage, saliency ignored."""
    return select_scope(features, None, budget, alpha=0.0, impl=impl, precision=precision)


# --------------------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------------------


def _topk_first_index(score: torch.Tensor, k: int) -> torch.Tensor:
    # a stable descending sort breaks ties by the lower index, like argmax; topk does not promise that
    return score.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values


def select_saliency(features, saliency, budget):
    """Top-K tokens by CLS attention (the "saliency-only" ablation; VisionZip's dominant tokens)."""
    return _topk_first_index(_need_saliency("saliency", saliency), budget)


def select_random(features, saliency, budget, seed: int = 0, sample_ids=None):
    """K tokens uniformly at random, reproducible from ``seed``.

    Without ``sample_ids`` one generator seeded with ``seed`` draws the rows in turn. With ``sample_ids``
    (one int per row, e.g. a hash of the image) row b is drawn from its own generator seeded with
    ``(seed, sample_ids[b])``: a sample's draw then depends only on the seed and the sample, not on its
    batch or position (what :mod:`scope.patch` passes).
    """
    B, N, _ = features.shape
    if sample_ids is None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        idx = torch.stack([torch.randperm(N, generator=gen)[:budget] for _ in range(B)])
    else:
        if len(sample_ids) != B:
            raise ValueError(f"sample_ids has {len(sample_ids)} entries for {B} samples")
        gens = [torch.Generator(device="cpu").manual_seed(_mix(seed, i)) for i in sample_ids]
        idx = torch.stack([torch.randperm(N, generator=g)[:budget] for g in gens])
    return idx.sort(-1).values.to(features.device)


def _mix(seed: int, sample_id: int) -> int:
    # one 63-bit generator seed per (seed, sample): splitmix64's finaliser on their combination
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(sample_id)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def _grid_shape(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"uniform needs grid=(rows, cols) for a non-square token count N={n}")
        return side, side
    h, w = (int(g) for g in grid)
    if h * w != n:
        raise ValueError(f"grid={tuple(grid)} has {h * w} cells but there are N={n} tokens")
    return h, w


def uniform_indices(n: int, budget: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """K raster indices spread evenly over an ``rows x cols`` grid (cell centres of a coarser lattice)."""
    h, w = _grid_shape(n, grid)
    rows = max(1, min(h, round(math.sqrt(budget * h / w))))
    cols = math.ceil(budget / rows)
    if cols > w:  # budget close to N: fall back to even spacing along the raster order
        return torch.linspace(0, n - 1, budget).round().long()
    r = ((torch.arange(rows) + 0.5) * h / rows).long()
    c = ((torch.arange(cols) + 0.5) * w / cols).long()
    lattice = (r[:, None] * w + c[None, :]).flatten()  # rows*cols >= budget points, all distinct
    pick = torch.linspace(0, lattice.numel() - 1, budget).round().long()
    return lattice[pick].sort().values


def select_uniform(features, saliency, budget, grid: tuple[int, int] | None = None):
    B, N, _ = features.shape
    return uniform_indices(N, budget, grid).to(features.device).expand(B, budget).clone()


def select_divprune(features, saliency, budget, feature_space: str = "vision", precision: str = "float32"):
    """DivPrune (Alvar et al., CVPR 2025): greedy max-min cosine distance.

    The first pick is the token farthest from its nearest neighbour; each next pick maximises its
    distance to the closest token already kept. Ties go to the lowest index. ``feature_space``: which
    features the caller passes ("vision" or, as the authors, "projected"; :mod:`scope.patch` reads it);
    ``precision="float16"``: the authors' half-precision arithmetic (:func:`scope.half.divprune_half`).
    """
    if precision == "float16":
        return divprune_half(features, budget)
    B, N, _ = features.shape
    dist = 1.0 - cosine_similarity_matrix(features)  # [B, N, N]
    rows_b = torch.arange(B, device=features.device)
    if N == 1:
        return torch.zeros(B, 1, dtype=torch.long, device=features.device)
    eye = torch.eye(N, dtype=torch.bool, device=features.device)
    nearest = dist.masked_fill(eye, float("inf")).min(-1).values
    first = nearest.argmax(-1)
    picks = [first]
    mind = dist[rows_b, first].clone()  # distance of every token to the kept set
    mind[rows_b, first] = float("-inf")
    for _ in range(budget - 1):
        v = mind.argmax(-1)
        picks.append(v)
        mind = torch.minimum(mind, dist[rows_b, v])  # kept tokens stay at -inf: never picked again
        mind[rows_b, v] = float("-inf")
    return torch.stack(picks, -1).sort(-1).values


def visionzip_counts(budget: int, n_contextual: int | None = None) -> tuple[int, int]:
    """(dominant, contextual) split of a budget. VisionZip uses 54+10, 108+20, 162+30 at 64/128/192."""
    if n_contextual is None:
        n_contextual = round(budget * 10 / 64) if budget > 1 else 0
    n_contextual = int(n_contextual)
    if not 0 <= n_contextual < budget:
        raise ValueError(f"n_contextual must be in [0, budget={budget}), got {n_contextual}")
    return budget - n_contextual, n_contextual


def merge_visionzip(
    features, saliency, budget, n_contextual=None, metric=None, order="raster", keep_cls=False, cls_token=None
):
    """VisionZip (Yang et al., CVPR 2025): dominant tokens by saliency + merged contextual tokens.

    Dominant: the top ``budget - n_contextual`` tokens by CLS attention. Contextual: of the remaining
    tokens (raster order), every ``step``-th becomes a centre; each other remaining token joins the centre
    most similar to it (cosine of ``metric``, default the features; VisionZip uses the attention keys), and
    a centre's output is its own feature plus the mean of the features that joined it (VisionZip's rule).
    ``keep_cls=True`` (official): the CLS token ``cls_token [B, d]`` (index -1) is the first dominant token.
    ``order``: "raster" (ascending indices) or "official" (CLS, dominant tokens ascending, then the
    contextual tokens: ``Pruned.n_appended`` of them).
    """
    sal = _need_saliency("visionzip", saliency)
    B, N, d = features.shape
    n_dom, n_ctx = visionzip_counts(budget, n_contextual)
    if order not in ("raster", "official"):
        raise ValueError(f"visionzip order must be 'raster' or 'official', got order={order!r}")
    if keep_cls and (cls_token is None or tuple(cls_token.shape) != (B, d)):
        got = None if cls_token is None else tuple(cls_token.shape)
        raise ValueError(f"visionzip keep_cls=True needs cls_token of shape {(B, d)}, got {got}")
    dominant = _topk_first_index(sal, n_dom - int(keep_cls))
    idx, feats = [dominant], [features.gather(1, dominant[..., None].expand(-1, -1, d))]
    if keep_cls:
        idx.insert(0, dominant.new_full((B, 1), -1))
        feats.insert(0, cls_token.to(features.dtype)[:, None])
    if n_ctx > 0:
        if metric is None:
            metric = features
        elif tuple(metric.shape[:2]) != (B, N):
            raise ValueError(f"metric shape {tuple(metric.shape)} must start with (B, N) = {(B, N)}")
        else:
            _check_finite("metric", metric)
        metric = metric.to(features.dtype)
        keep = torch.ones(B, N, dtype=torch.bool, device=features.device)
        keep.scatter_(1, dominant, False)
        rest = keep.nonzero()[:, 1].view(B, N - dominant.shape[1])  # remaining tokens, raster order
        step = max(1, rest.shape[1] // n_ctx)
        pos = torch.arange(0, rest.shape[1], step, device=features.device)[:n_ctx]
        centres = rest[:, pos]  # [B, n_ctx]
        others_mask = torch.ones(rest.shape[1], dtype=torch.bool, device=features.device)
        others_mask[pos] = False
        others = rest[:, others_mask]  # [B, R]
        unit = F.normalize(metric, dim=-1, eps=1e-12)
        sim = unit.gather(1, others[..., None].expand(-1, -1, unit.shape[-1])) @ unit.gather(
            1, centres[..., None].expand(-1, -1, unit.shape[-1])
        ).transpose(1, 2)  # [B, R, n_ctx]
        assign = F.one_hot(sim.argmax(-1), n_ctx).to(features.dtype)  # [B, R, n_ctx]
        counts = assign.sum(1).clamp(min=1).unsqueeze(-1)
        other_feats = features.gather(1, others[..., None].expand(-1, -1, d))
        merged = assign.transpose(1, 2) @ other_feats / counts
        idx.append(centres)
        feats.append(features.gather(1, centres[..., None].expand(-1, -1, d)) + merged)
    idx, feats = torch.cat(idx, 1), torch.cat(feats, 1)
    if order == "official":
        return Pruned(idx, feats, n_ctx)
    perm = idx.argsort(-1)
    return Pruned(idx.gather(1, perm), feats.gather(1, perm[..., None].expand(-1, -1, d)))


# --------------------------------------------------------------------------------------------------------
# one-call API
# --------------------------------------------------------------------------------------------------------


def prune(
    features: torch.Tensor,
    saliency: torch.Tensor | None = None,
    budget: int = 64,
    method: str = "scope",
    **options,
) -> Pruned:
    """Keep ``budget`` of the N tokens and return their indices and the features that enter the projector.

    Args:
        features: ``[B, N, d]`` or ``[N, d]`` token features (LLaVA: vision layer -2, CLS dropped).
        saliency: ``[B, N]`` or ``[N]`` CLS attention summed over heads; needed by the methods whose
            registry record says so (scope with alpha != 0, saliency, visionzip).
        budget: K, the number of tokens kept per sample (1 <= K <= N).
        method: a pre-LLM method of the registry (:data:`scope.METHODS`, :func:`scope.methods.names`).
        **options: the method's options (its record lists them with their defaults), e.g. ``alpha``,
            ``combine`` ("mul"|"add"), ``impl`` ("fast"|"reference"), ``precision`` ("float32"|"float16")
            for scope; ``seed`` for random; :func:`scope.methods.paper_options` gives the authors' settings.

    Returns:
        :class:`Pruned` ``(indices [B, K] ascending, features [B, K, d], n_appended)`` (unbatched in,
        unbatched out), features in the input's dtype.
    """
    record = get_method(method)
    if record.stage != PRE_LLM:
        raise ValueError(
            f"method {record.name!r} is not a selection method (stage {record.stage!r}); "
            f"scope.select / scope.prune take one of {names(PRE_LLM)}"
        )
    options = record.check_options(options)
    feats, sal, unbatched = _prepare(features, saliency, budget)
    if sal is None and record.needs_saliency(options):
        raise ValueError(f"method={record.name!r} needs a saliency tensor (CLS attention), got saliency=None")
    for name, dims in (("metric", 2), ("cls_token", 1)):  # unbatched tensors of an unbatched call
        value = options.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == dims:
            options[name] = value.unsqueeze(0)
    out = record.function(feats, sal, int(budget), **options)
    appended = 0
    if isinstance(out, Pruned):
        idx, kept, appended = out.indices, out.features.to(features.dtype), out.n_appended
    else:
        idx = out
        src = features.unsqueeze(0) if unbatched else features
        kept = src.gather(1, idx[..., None].expand(-1, -1, src.shape[-1]))
    if unbatched:
        return Pruned(idx[0], kept[0], appended)
    return Pruned(idx, kept, appended)


def select(
    features: torch.Tensor,
    saliency: torch.Tensor | None = None,
    budget: int = 64,
    method: str = "scope",
    **options,
) -> torch.Tensor:
    """Indices of the ``budget`` kept tokens, ascending: ``LongTensor[B, K]`` (``[K]`` for unbatched input).

    See :func:`prune` for the arguments. For VisionZip these are the dominant tokens plus the contextual
    centres (the merged features come from :func:`prune`).
    """
    return prune(features, saliency, budget, method, **options).indices
