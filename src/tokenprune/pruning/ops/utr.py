"""UTR-style hybrid prune + merge for SSM hidden states, scan order preserved.

After Zhan et al., "Rethinking Token Reduction for State Space Models" (EMNLP 2024, wuyushuwys/ToR_SSM):
token importance is the clipped (>= 0), channel-summed SSM output, and a token that leaves the sequence
is either pruned or merged into a similar token that stays, so less information is lost than with
pruning alone, while the kept tokens keep their positions in the scan.

What this function does (the caller supplies scores, e.g. that importance, and the metric):
1. keep the ``keep`` highest-scoring unprotected tokens and every protected one, in ascending order;
2. of the removed tokens, the lowest-scoring ``round(prune_fraction * n_removed)`` are dropped;
3. each other removed token is merged (size-weighted average) into the kept, unprotected token most
   similar to it (cosine on ``metric``).

Differences from the reference code, on purpose:
- In the paper, the tokens to reduce come from similarity-matched pairs between a less-important and a
  more-important set; here the removed set is simply the lowest-scoring tokens, so the budget is exact
  and the kept set is the same as score pruning at the same budget (the two differ only in what happens
  to the removed tokens).
- The public ``hybrid`` path (``bipartite_hybrid_pure``) builds its sets by sorting the metric along the
  token axis channel by channel and applies the indices to an even/odd split, and by default keeps the
  length with zeroed tokens; we follow the paper's description instead and shorten the sequence.
- Protected tokens (CLS) are never dropped, never merged and never receive a merge. With keep == 0 there
  is no merge target and every removed token is dropped.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .select import batched_gather, complement_indices, protected_count, topk_indices


def merge_into(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, kept: torch.Tensor, merged: torch.Tensor,
    target_ok: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens ``merged`` (B, M) into their most similar token among ``kept`` (B, K).

    Returns the kept rows (B, K, D) with x_t' = (s_t x_t + sum s_i x_i) / (s_t + sum s_i) and sizes
    s_t' = s_t + sum s_i. ``target_ok`` (B, K) bool marks kept rows that may receive merges.
    """
    xk, sk = batched_gather(x, kept), size.gather(1, kept)
    if int(merged.shape[1]) == 0:
        return xk, sk
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = batched_gather(m, merged) @ batched_gather(m, kept).transpose(1, 2)  # (B, M, K)
        if target_ok is not None:
            sim = sim.masked_fill(~target_ok[:, None, :], float("-inf"))
        dst = sim.argmax(dim=-1)  # (B, M)
    sm = size.gather(1, merged)
    acc = (xk * sk[..., None].to(x.dtype)).scatter_add(
        1, dst[..., None].expand(-1, -1, int(x.shape[-1])), batched_gather(x, merged) * sm[..., None].to(x.dtype))
    s_out = sk.scatter_add(1, dst, sm)
    return acc / s_out[..., None].to(x.dtype), s_out


def utr_reduce(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    scores: torch.Tensor,
    metric: torch.Tensor,
    keep: int,
    prune_fraction: float = 0.5,
    protected: Optional[torch.Tensor] = None,
    n_protected: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hybrid reduction to keep + n_protected tokens, order preserved.

    Args:
        x: (B, T, D); size: (B, T) or None (ones); scores: (B, T) importance; metric: (B, T, C).
        keep: unprotected tokens to keep, 0 <= keep <= T - n_protected.
        prune_fraction: share of the removed tokens (the lowest-scoring ones) that is dropped, in [0, 1];
            0 merges all of them, 1 is plain pruning. Rounded half up.
        protected: (B, T) bool or None.
        n_protected: their count per row when the caller knows it (no read-back from the device).

    Returns:
        x_out (B, keep + n_protected, D), size_out, src_index (B, keep + n_protected) ascending.
    """
    if x.dim() != 3 or scores.shape != x.shape[:2] or metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"x (B, T, D), scores (B, T) and metric (B, T, C) must agree, got "
                         f"{tuple(x.shape)}, {tuple(scores.shape)}, {tuple(metric.shape)}")
    if isinstance(prune_fraction, bool) or not (0.0 <= float(prune_fraction) <= 1.0):
        raise ValueError(f"prune_fraction must be in [0, 1], got {prune_fraction!r}")
    B, T, _ = (int(s) for s in x.shape)  # python ints also under jit tracing (FLOP counting)
    if size is None:
        size = torch.ones(B, T, dtype=x.dtype, device=x.device)
    n_p = protected_count(protected, scores.shape, n_protected)
    kept = topk_indices(scores, keep, protected, keep_order=True, n_protected=n_p)
    removed = complement_indices(kept, T)
    n_rm = int(removed.shape[1])
    n_prune = n_rm if keep == 0 else min(n_rm, math.floor(round(float(prune_fraction) * n_rm, 9) + 0.5))
    # Removed tokens from lowest score up: the first n_prune are dropped, the rest merged.
    by_score = torch.sort(scores.detach().gather(1, removed), dim=1, stable=True).indices
    merged = removed.gather(1, by_score[:, n_prune:])
    target_ok = None if n_p == 0 else ~protected.gather(1, kept)
    x_out, s_out = merge_into(x, size, metric, kept, merged, target_ok)
    return x_out, s_out, kept
