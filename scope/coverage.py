"""Coverage of a kept token set: the facility-location objective SCOPE maximises and the theta-coverage
diagnostic of the paper's Fig. 2.

``C(u, T) = max_{t in T} cos(f_u, f_t)`` (0 when T is empty) is how well token u is represented by the
kept set T. Set coverage sums it over all N tokens; theta-coverage is the fraction of tokens with
``C(u, T) >= theta``.
"""

from __future__ import annotations

import torch

from .select import compute_dtype, cosine_similarity_matrix

__all__ = ["token_coverage", "set_coverage", "theta_coverage", "coverage_gain"]


def _batched(features: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be [N, d] or [B, N, d], got shape {tuple(features.shape)}")
    unbatched = features.dim() == 2
    feats = features.unsqueeze(0) if unbatched else features
    kept = torch.as_tensor(kept, device=feats.device)
    if kept.dim() == 1:
        kept = kept.unsqueeze(0).expand(feats.shape[0], -1)
    if kept.dim() != 2 or kept.shape[0] != feats.shape[0]:
        raise ValueError(
            f"kept shape {tuple(kept.shape)} does not match features shape {tuple(features.shape)}"
        )
    if kept.dtype in (torch.bool,) or kept.is_floating_point():
        raise ValueError(f"kept must hold integer indices, got dtype {kept.dtype}")
    N = feats.shape[1]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= N):
        raise ValueError(
            f"kept indices must be in [0, N={N}), got range [{int(kept.min())}, {int(kept.max())}]"
        )
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("features contains NaN or inf")
    return feats.to(compute_dtype(feats.dtype)), kept.long(), unbatched


def token_coverage(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``C(u, T)`` for every token: ``[B, N]`` (``[N]`` unbatched); 0 everywhere when T is empty."""
    feats, kept, unbatched = _batched(features, kept)
    B, N, _ = feats.shape
    if kept.shape[1] == 0:
        cov = torch.zeros(B, N, dtype=feats.dtype, device=feats.device)
    else:
        sim = cosine_similarity_matrix(feats)  # [B, N, N]
        cov = sim.gather(2, kept[:, None, :].expand(B, N, -1)).amax(-1).clamp(0, 1)
        cov.scatter_(
            1, kept, 1.0
        )  # a kept token covers itself exactly (fp32 self-similarity can be 1 - 6e-8)
    return cov[0] if unbatched else cov


def set_coverage(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Facility-location value ``f(T) = sum_u C(u, T)``: ``[B]`` (scalar tensor unbatched)."""
    return token_coverage(features, kept).sum(-1)


def coverage_gain(features: torch.Tensor, kept: torch.Tensor, candidate: int) -> torch.Tensor:
    """``f(T + v) - f(T)`` for one candidate index v: ``[B]`` (scalar unbatched)."""
    kept = torch.as_tensor(kept, device=features.device, dtype=torch.long)
    # the candidate as one more column (shaped from kept's leading dims, so an empty kept set works too)
    plus = torch.cat([kept, torch.full((*kept.shape[:-1], 1), int(candidate), device=kept.device)], -1)
    return set_coverage(features, plus) - set_coverage(features, kept)


def theta_coverage(features: torch.Tensor, kept: torch.Tensor, theta) -> torch.Tensor:
    """Fraction of the N tokens whose best similarity to a kept token is at least ``theta``.

    ``theta`` is a float (returns ``[B]``) or a 1-D tensor/sequence of T thresholds (returns ``[B, T]``);
    unbatched input drops the leading B.
    """
    cov = token_coverage(features, kept)
    th = torch.as_tensor(theta, dtype=cov.dtype, device=cov.device)
    if th.dim() > 1:
        raise ValueError(f"theta must be a scalar or 1-D, got shape {tuple(th.shape)}")
    if not bool(torch.isfinite(th).all()):
        raise ValueError(f"theta must be finite, got {theta!r}")
    if th.dim() == 0:
        return (cov >= th).to(cov.dtype).mean(-1)
    return (cov.unsqueeze(-1) >= th).to(cov.dtype).mean(-2)
