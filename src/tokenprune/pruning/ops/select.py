"""Top-k selection with protected tokens, complements and budget arithmetic.

Ties are broken towards the lower index everywhere (stable sorts), so a run is reproducible
across devices and batch sizes; ``torch.topk`` gives no such promise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...tokens.checks import check_values


def _check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep ratio must be in (0, 1], got {keep!r}")
    return float(keep)


def _check_n(n_tokens) -> int:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    return n_tokens


def keep_count(n_tokens: int, keep: float) -> int:
    """round(keep * n_tokens) clamped to [1, n_tokens]; halves round up (not Python's banker's round).

    The product is rounded to 9 decimals first so that e.g. 0.7 * 10 is 7, not 7.000000000000001.
    """
    n, k = _check_n(n_tokens), _check_keep(keep)
    return max(1, min(n, math.floor(round(k * n, 9) + 0.5)))


def keep_count_ceil(n_tokens: int, keep: float) -> int:
    """ceil(keep * n_tokens) clamped to [1, n_tokens] (EViT: ceil(keep * (N - 1)) non-CLS tokens)."""
    n, k = _check_n(n_tokens), _check_keep(keep)
    return max(1, min(n, math.ceil(round(k * n, 9))))


def keep_count_even(n_tokens: int, keep: float) -> int:
    """The official ToP count: ceil(keep * n_tokens), lowered to an even number (at least 1) so the middle CLS
    has as many kept tokens before it as after it. ViM-S at 0.8 after layers 5, 10, 15: 196 -> 156 -> 124 ->
    100 patches, i.e. 197 -> 157 -> 125 -> 101 tokens with the CLS, the published sequence. keep 1 keeps
    every token (no pruning means no pruning, whatever the parity)."""
    k = keep_count_ceil(n_tokens, keep)
    return k if k == n_tokens and keep >= 1.0 else max(1, k - k % 2)


def protected_count(protected: Optional[torch.Tensor], shape, n_protected: Optional[int] = None) -> int:
    """Number of protected tokens per row; it must be the same for every row (rectangular batches).

    A caller that knows the count (a python int from the token state) passes `n_protected`: it is then
    checked against the data only where value checks run (see ``checks``), so the GPU is never read back.
    """
    if protected is None:
        return 0
    if protected.dtype != torch.bool or tuple(int(s) for s in protected.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"protected must be a bool tensor of shape {tuple(shape)}, "
                         f"got {protected.dtype} {tuple(protected.shape)}")
    if n_protected is not None and not check_values(protected):
        return int(n_protected)
    counts = protected.sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"every row must have the same number of protected tokens, got {counts.tolist()}")
    found = int(counts[0]) if counts.numel() else 0
    if n_protected is not None and found != n_protected:
        raise ValueError(f"{found} protected tokens per row, but the caller expected n_protected={n_protected}")
    return found


def topk_indices(
    scores: torch.Tensor, k: int, protected: Optional[torch.Tensor] = None, keep_order: bool = True,
    n_protected: Optional[int] = None,
) -> torch.Tensor:
    """Keep the k highest-scoring non-protected tokens plus every protected token.

    Args:
        scores: (B, T).
        k: number of non-protected tokens to keep, 0 <= k <= T - n_protected.
        protected: (B, T) bool or None; the same count per row.
        n_protected: that count when the caller knows it (no read-back on accelerators).
        keep_order: True -> ascending indices (scan order, for SSMs); False -> protected tokens first
            (ascending index), then the kept ones by descending score.

    Returns:
        (B, k + n_protected) long indices.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, T), got shape {tuple(scores.shape)}")
    B, T = (int(s) for s in scores.shape)  # python ints also under jit tracing (FLOP counting)
    n_p = protected_count(protected, scores.shape, n_protected)
    if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k <= T - n_p):
        raise ValueError(f"k must be an int in [0, {T - n_p}] ({T} tokens, {n_p} protected), got {k!r}")
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    if n_p:
        # Stable re-sort on the flag keeps score order inside each group: unprotected first.
        flag = protected.gather(1, order).to(torch.int8)
        order = order.gather(1, torch.sort(flag, dim=1, stable=True).indices)
    kept = order[:, :k]
    if keep_order:
        if n_p:
            kept = torch.cat([kept, order[:, T - n_p:]], dim=1)
        return kept.sort(dim=1).values
    if not n_p:
        return kept
    prot = torch.sort((~protected).to(torch.int8), dim=1, stable=True).indices[:, :n_p]
    return torch.cat([prot, kept], dim=1)


def complement_indices(idx: torch.Tensor, T: int) -> torch.Tensor:
    """Indices in [0, T) that are not in idx, ascending.

    Args:
        idx: (B, K) long, unique per row.
    Returns:
        (B, T - K) long.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must be (B, K), got shape {tuple(idx.shape)}")
    B, K = (int(s) for s in idx.shape)
    checked = check_values(idx)
    if K > T or (checked and idx.numel() and (idx.min() < 0 or idx.max() >= T)):
        raise ValueError(f"idx must hold at most T={T} indices in [0, {T - 1}], got {K} indices")
    # Out-of-place scatter of a tensor: jit tracing has no scatter_ with a bool scalar.
    taken = torch.zeros(B, T, dtype=torch.int8, device=idx.device).scatter(
        1, idx, torch.ones_like(idx, dtype=torch.int8))
    if checked and int(taken.sum()) != B * K:
        raise ValueError("idx has repeated indices in a row; complement_indices needs unique indices")
    # A stable sort on the taken flag lists the untaken indices first, ascending: no boolean-mask
    # indexing, whose output size the host would have to read back.
    return torch.sort(taken, dim=1, stable=True).indices[:, : T - K]


def batched_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) gathered along dim 1 with idx (B, K) -> (B, K, ...)."""
    view = idx.reshape(*idx.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, view.expand(*idx.shape, *x.shape[2:]))
