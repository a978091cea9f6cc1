"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023), with per-token protection.

Tokens alternate into set A (even positions) and set B (odd positions). Each A token finds its most
similar B token (cosine on the metric, usually head-averaged keys); the r A tokens with the best match
are merged into it. Output order: [unmerged A tokens in their original relative order, all B tokens],
as the official code (which sorts the unmerged A tokens when a class token is present).

The matching is computed once and returned as closures, so the same merge applies to x, sizes,
positions and any other per-token tensor.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ...tokens.checks import check_values
from ...tokens.state import static_index


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def _as3d(fn):
    """Let a (B, T, C) closure also take (B, T) tensors (sizes, flags)."""
    def wrapped(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return fn(x.unsqueeze(-1), *args, **kwargs).squeeze(-1) if x.dim() == 2 else fn(x, *args, **kwargs)
    return wrapped


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protected: Optional[torch.Tensor] = None,
    n_protected: Optional[int] = None, protected_a: Optional[int] = None,
) -> Tuple[Callable, Callable, torch.Tensor]:
    """Match tokens for merging.

    Args:
        metric: (B, T, C) similarity features; L2-normalised here.
        r: tokens to remove. Clamped to the number of unprotected A tokens and to (T - n_protected) // 2
            (at most half the tokens per step, as ToMe); 0 when every B token is protected.
        protected: (B, T) bool or None. Protected A tokens are never merged away and protected B tokens
            never receive a merge (their similarity is -inf).
        n_protected: protected tokens per row when the caller knows it (a python int from the token state):
            r is then clamped without reading counts back from the device. protected_a: how many of them sit
            in set A (e.g. from the CLS index); unknown, each set is assumed to hold up to n_protected,
            which only clamps r more.

    Returns:
        merge(x, mode="mean"|"sum"|"amax"...) (B, T, C) -> (B, T - r, C) (also (B, T) -> (B, T - r)),
        unmerge(y) (B, T - r, C) -> (B, T, C) giving every original token its output token's value,
        src_index (B, T - r) long: the original index of each output token (for merged tokens the B
        token that received the merge).
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, T, C), got shape {tuple(metric.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0, got {r!r}")
    B, T, _ = (int(s) for s in metric.shape)  # python ints also under jit tracing (FLOP counting)
    dev = metric.device
    if protected is None:
        protected = torch.zeros(B, T, dtype=torch.bool, device=dev)
    elif protected.dtype != torch.bool or protected.shape != (B, T):
        raise ValueError(f"protected must be a bool tensor of shape {(B, T)}, "
                         f"got {protected.dtype} {tuple(protected.shape)}")
    pa, pb = protected[:, ::2], protected[:, 1::2]
    Ta, Tb = int(pa.shape[1]), int(pb.shape[1])
    if B and Tb and n_protected is not None:
        # counts from the caller (python ints): no read-back; an unknown A/B split is bounded from above
        n_pa = min(n_protected, Ta) if protected_a is None else int(protected_a)
        n_pb = min(n_protected, Tb) if protected_a is None else n_protected - int(protected_a)
        if check_values(protected):
            found = (int(pa.sum(1).max()), int(pb.sum(1).max()), int(protected.sum(1).max()))
            if found[0] > n_pa or found[1] > n_pb or found[2] != n_protected:
                raise ValueError(f"n_protected={n_protected}, protected_a={protected_a}, but the rows hold "
                                 f"{found[2]} protected tokens, up to {found[0]} in set A and {found[1]} in set B")
        half = (T - n_protected) // 2
        r = 0 if Tb - n_pb <= 0 else max(0, min(r, Ta - n_pa, half))
    elif B and Tb:
        free_a = int((~pa).sum(1).min())
        half = int(((T - protected.sum(1)) // 2).min())
        r = 0 if int((~pb).sum(1).min()) == 0 else min(r, free_a, half)
    else:
        r = 0
    if r == 0:
        return _identity, _identity, torch.arange(T, device=dev).expand(B, T)

    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, Ta, Tb)
        scores = scores.masked_fill(pa[:, :, None] | pb[:, None, :], float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        # Stable: equal scores merge the lower-index A token first.
        edge_idx = torch.sort(node_max, dim=1, descending=True, stable=True).indices
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # (B, Ta - r), original relative order
        src_idx = edge_idx[:, :r]  # (B, r)
        dst_idx = node_idx.gather(1, src_idx)  # (B, r)
        odd = static_index(("tome_odd", Tb), dev, lambda d: 2 * torch.arange(Tb, device=d) + 1)  # B positions
        src_index = torch.cat([2 * unm_idx, odd.expand(B, Tb)], dim=1)

    @_as3d
    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        c = int(x.shape[-1])
        unm = src.gather(1, unm_idx[..., None].expand(B, Ta - r, c))
        src = src.gather(1, src_idx[..., None].expand(B, r, c))
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(B, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    @_as3d
    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c = int(y.shape[-1])
        unm, dst = y[:, : Ta - r], y[:, Ta - r:]
        out = y.new_zeros(B, T, c)
        out[:, 1::2] = dst
        out.scatter_(1, (2 * unm_idx)[..., None].expand(B, Ta - r, c), unm)
        out.scatter_(1, (2 * src_idx)[..., None].expand(B, r, c), dst.gather(1, dst_idx[..., None].expand(B, r, c)))
        return out

    return merge, unmerge, src_index


def merge_wavg(
    merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge (ToMe): x' = sum(s_i x_i) / sum(s_i), s' = sum(s_i).

    Args:
        x: (B, T, D); size: (B, T) or None (ones).
    Returns:
        x_merged (B, T', D) in x's dtype and size_merged (B, T').
    """
    if size is None:
        size = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    if x.dtype == size.dtype:
        # one merge for both (three launches fewer per layer): the sums run per column in the same order, so
        # the result is the same to the bit; not in a narrower dtype, where sizes past 256 would round
        joint = merge(torch.cat([x * size[..., None], size[..., None]], dim=-1), mode="sum")
        x_sum, size = joint[..., :-1], joint[..., -1]
    else:
        x_sum = merge(x * size[..., None], mode="sum")
        size = merge(size, mode="sum")
    return (x_sum / size[..., None]).to(x.dtype), size


def keep_order_permutation(src_index: torch.Tensor) -> torch.Tensor:
    """Permutation (B, T') that sorts merged outputs back into ascending original order.

    ``out.gather(1, perm)`` (or ``batched_gather``) then follows the scan order, which SSMs need.
    """
    return torch.sort(src_index, dim=1, stable=True).indices


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """log(size) as (B, 1, 1, T), to add to attention logits (B, heads, T, T): a token that stands for
    s patches gets the attention of s copies."""
    if size.dim() != 2:
        raise ValueError(f"size must be (B, T), got shape {tuple(size.shape)}")
    return size.log()[:, None, None, :]

