"""EViT: keep the tokens the CLS attends to most, fuse the rest into one token.

Follows youweiliang/evit: keep ceil(keep_rate * (N - 1)) non-CLS tokens by the head-averaged CLS
attention row, in descending-score order; the inattentive tokens are fused into one extra token
sum_i a_i x_i with the raw (not renormalised) attention weights, appended last. At the next reduction
the fused token is an ordinary non-CLS token.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .select import batched_gather


def _ranked(cls_attn: torch.Tensor, cls_index: Optional[int]) -> torch.Tensor:
    """All indices by descending score (ties: lower index first) with the CLS moved to the very end."""
    order = torch.sort(cls_attn.detach(), dim=1, descending=True, stable=True).indices
    if cls_index is None:
        return order
    T = int(cls_attn.shape[1])
    if isinstance(cls_index, bool) or not isinstance(cls_index, int) or not (0 <= cls_index < T):
        raise ValueError(f"cls_index must be an int in [0, {T - 1}] or None, got {cls_index!r}")
    # A stable sort on the is-CLS flag keeps the score order of everything else.
    return order.gather(1, torch.sort((order == cls_index).to(torch.int8), dim=1, stable=True).indices)


def evit_select(
    cls_attn: torch.Tensor, keep: int, cls_index: Optional[int] = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split non-CLS tokens into attentive (kept) and inattentive (dropped).

    Args:
        cls_attn: (B, T) head-averaged attention of the CLS query to every token (CLS column included).
        keep: number of non-CLS tokens to keep, 1 <= keep <= T - 1 (T with no CLS).
        cls_index: position of the CLS, or None when there is none.

    Returns:
        kept_idx (B, keep) original indices by descending score (ties: lower index first),
        dropped_idx (B, T - 1 - keep) ascending, dropped_weight (B, T - 1 - keep) raw attention weights.
    """
    if cls_attn.dim() != 2:
        raise ValueError(f"cls_attn must be (B, T), got shape {tuple(cls_attn.shape)}")
    T = int(cls_attn.shape[1])  # a python int also under jit tracing (FLOP counting)
    n_cand = T - (cls_index is not None)
    if isinstance(keep, bool) or not isinstance(keep, int) or not (1 <= keep <= n_cand):
        raise ValueError(f"keep must be an int in [1, {n_cand}] (non-CLS tokens), got {keep!r}")
    order = _ranked(cls_attn, cls_index)
    kept = order[:, :keep]
    # The CLS sorts last, so positions keep..n_cand are the dropped non-CLS tokens.
    dropped = order[:, keep:n_cand].sort(dim=1).values
    return kept, dropped, cls_attn.gather(1, dropped)


def evit_fuse(
    x: torch.Tensor, dropped_idx: torch.Tensor, dropped_weight: torch.Tensor,
    size: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fuse the dropped tokens into one: sum_i a_i x_i.

    Args:
        x: (B, T, D); dropped_idx, dropped_weight: (B, M); size: (B, T) or None (ones).

    Returns:
        fused (B, 1, D) and fused_size (B, 1) = sum of the dropped sizes (0 when M = 0).
    """
    xd = batched_gather(x, dropped_idx)
    # A batched matmul (bit-identical to the einsum it replaces): fvcore counts it as an int, einsum as a float.
    fused = dropped_weight.to(x.dtype).unsqueeze(1) @ xd
    if size is None:
        fused_size = torch.full((int(x.shape[0]), 1), float(dropped_idx.shape[1]), dtype=x.dtype, device=x.device)
    else:
        fused_size = size.gather(1, dropped_idx).sum(dim=1, keepdim=True)
    return fused, fused_size


def evit_reduce(
    x: torch.Tensor, size: Optional[torch.Tensor], cls_attn: torch.Tensor, keep: int,
    cls_index: Optional[int] = 0, keep_order: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EViT step on hidden states.

    Args:
        x: (B, T, D); size: (B, T) or None (ones); cls_attn: (B, T); keep: non-CLS tokens to keep.
        cls_index: CLS position or None.
        keep_order: False -> [CLS, kept by descending score, fused] (official);
            True -> CLS and kept tokens in ascending original order (the CLS stays where it sorts, which
            is first when it is at index 0), then fused. SSMs need this.

    Returns:
        x_out (B, n_cls + keep + 1, D), size_out (B, n_cls + keep + 1), src_index (B, n_cls + keep):
        original index of each row but the fused one, which is always last.
        When nothing is dropped (keep == T - n_cls) the input comes back unchanged with
        src_index = arange(T) and no fused token, as the official code does (keep ratio 1 = identity).
    """
    if x.dim() != 3 or x.shape[:2] != cls_attn.shape:
        raise ValueError(f"x must be (B, T, D) matching cls_attn {tuple(cls_attn.shape)}, got {tuple(x.shape)}")
    B, T, _ = (int(s) for s in x.shape)
    if size is None:
        size = torch.ones(B, T, dtype=x.dtype, device=x.device)
    kept, dropped, weight = evit_select(cls_attn, keep, cls_index)
    if int(dropped.shape[1]) == 0:
        return x, size, torch.arange(T, device=x.device).expand(B, T)
    if cls_index is not None:
        cls = torch.full((B, 1), cls_index, dtype=kept.dtype, device=kept.device)
        kept = torch.cat([cls, kept], dim=1)
    if keep_order:
        kept = kept.sort(dim=1).values
    fused, fused_size = evit_fuse(x, dropped, weight, size)
    x_out = torch.cat([batched_gather(x, kept), fused], dim=1)
    size_out = torch.cat([size.gather(1, kept), fused_size.to(size.dtype)], dim=1)
    return x_out, size_out, kept
