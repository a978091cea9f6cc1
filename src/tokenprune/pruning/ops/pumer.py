"""PuMer, vision-only (after Cao et al., ACL 2023): prune by importance, then merge by similarity.

PuMer prunes image tokens by their (text-informed) importance and then merges the survivors with
ToMe's bipartite matching. Here the importance is whatever score the caller gives (there is no text),
and the result is put back into ascending original order so SSMs can scan it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .select import batched_gather, protected_count, topk_indices
from .tome import bipartite_soft_matching, keep_order_permutation, merge_wavg


def pumer_reduce(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    scores: torch.Tensor,
    metric: torch.Tensor,
    prune_keep: int,
    merge_r: int,
    protected: Optional[torch.Tensor] = None,
    n_protected: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune to ``prune_keep`` unprotected tokens (+ protected), then ToMe-merge ``merge_r`` pairs.

    Args:
        x: (B, T, D); size: (B, T) or None (ones); scores: (B, T); metric: (B, T, C).
        prune_keep: unprotected tokens kept by the pruning step (0 <= prune_keep <= T - n_protected).
        merge_r: tokens removed by merging; clamped as in ``bipartite_soft_matching`` (at most half of
            the survivors, never a protected token), so the output has
            prune_keep + n_protected - r_effective tokens.
        protected: (B, T) bool or None; protected tokens are neither pruned nor merged.
        n_protected: their count per row when the caller knows it (no read-back from the device).

    Returns:
        x_out (B, T', D), size_out (B, T'), src_index (B, T') ascending original indices (a merged
        token carries the index of the token that received the merge).
    """
    if x.dim() != 3 or scores.shape != x.shape[:2] or metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"x (B, T, D), scores (B, T) and metric (B, T, C) must agree, got "
                         f"{tuple(x.shape)}, {tuple(scores.shape)}, {tuple(metric.shape)}")
    if isinstance(merge_r, bool) or not isinstance(merge_r, int) or merge_r < 0:
        raise ValueError(f"merge_r must be an int >= 0, got {merge_r!r}")
    B, T, _ = (int(s) for s in x.shape)
    if size is None:
        size = torch.ones(B, T, dtype=x.dtype, device=x.device)
    n_p = protected_count(protected, scores.shape, n_protected)
    idx = topk_indices(scores, prune_keep, protected, keep_order=True, n_protected=n_p)
    x, size, metric = batched_gather(x, idx), size.gather(1, idx), batched_gather(metric, idx)
    prot = None if protected is None else protected.gather(1, idx)

    merge, _, src_local = bipartite_soft_matching(metric, merge_r, prot, n_protected=n_p)
    x, size = merge_wavg(merge, x, size)
    src = idx.gather(1, src_local)
    perm = keep_order_permutation(src)
    return batched_gather(x, perm), size.gather(1, perm), src.gather(1, perm)
