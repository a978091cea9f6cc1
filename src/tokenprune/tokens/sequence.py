"""Hidden-state alignment (HSA) helpers for pruned SSM scans.

After pruning, a kept token's state update h_t = exp(D_t A) h_prev + D_t B_t u_t sees a previous state that
is fewer steps old than before. Two ways to keep the neighbourhood stable:
(a) masking: pruned positions stay in the scan with zero input (``scatter_to_sequence``): exact decay
    over the gaps, no speed-up;
(b) gap-aware decay: a kept token preceded by g pruned positions decays by exp((1 + g) D_t A) while its
    input term stays D_t B_t u_t. With a standard kernel: scale D_t by (1 + g) and B_t by 1 / (1 + g)
    (``gap_scaled_delta_B``). The backward direction counts gaps in its own order (``gap_bwd``).
Scan orders other than raster (PlainMamba zig-zags) visit the kept tokens in ``restricted_order``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .checks import check_values


def _check_pos(pos: torch.Tensor, seq_len: int, strictly_increasing: bool) -> None:
    if pos.dim() != 2 or pos.dtype != torch.long:
        raise ValueError(f"pos must be a (B, T) long tensor, got {pos.dtype} {tuple(pos.shape)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < int(pos.shape[1]):
        raise ValueError(f"seq_len must be an int >= T={pos.shape[1]}, got {seq_len!r}")
    if not check_values(pos):
        return
    if pos.numel() and (pos.min() < 0 or pos.max() >= seq_len):
        raise ValueError(f"pos values must be in [0, {seq_len - 1}], "
                         f"got range [{int(pos.min())}, {int(pos.max())}]")
    if strictly_increasing and int(pos.shape[1]) > 1 and bool((pos[:, 1:] <= pos[:, :-1]).any()):
        raise ValueError("pos must be strictly increasing along each row (kept tokens in scan order)")


def scan_gaps(pos: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pruned positions next to each kept token, in both scan directions.

    Args:
        pos: (B, T) long, strictly increasing original positions of the kept tokens.
        seq_len: length of the unpruned sequence.

    Returns:
        gap_fwd (B, T): pruned positions between the previous kept token and t (gap_fwd[0] = pos[0]);
        gap_bwd (B, T): pruned positions between t and the next kept token
        (gap_bwd[T-1] = seq_len - 1 - pos[T-1]), i.e. the gap before t in the backward scan, in token order.
        Both long. Flip gap_bwd along T to feed a kernel that runs on the flipped sequence.
    """
    _check_pos(pos, seq_len, strictly_increasing=True)
    first = pos[:, :1]
    last = (seq_len - 1) - pos[:, -1:]
    inner = pos[:, 1:] - pos[:, :-1] - 1
    return torch.cat([first, inner], dim=1), torch.cat([inner, last], dim=1)


def scan_gaps_unordered(pos: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scan_gaps`` for sequences with tokens out of monotone order (ViM's re-placed middle CLS, fused
    extra tokens with pos -1): such tokens get gap 0 and do not reset the count, so their neighbours see
    the gap to the last *ordered* token (cummax forwards, cummin backwards). Equals ``scan_gaps`` when pos
    is strictly increasing. Returns float (B, T) tensors.
    """
    p = pos.float()
    B = int(p.shape[0])
    prev = torch.cat([p.new_full((B, 1), -1.0), p[:, :-1]], 1).cummax(dim=1).values
    nxt = torch.cat([p[:, 1:], p.new_full((B, 1), float(seq_len))], 1)
    nxt = torch.where(nxt < 0, torch.full_like(nxt, float(seq_len)), nxt).flip(1).cummin(dim=1).values.flip(1)
    invalid = pos < 0
    gap_f = (p - prev - 1).clamp(min=0).masked_fill(invalid, 0)
    gap_b = (nxt - p - 1).clamp(min=0).masked_fill(invalid, 0)
    return gap_f, gap_b


def gap_scale(gap: torch.Tensor) -> torch.Tensor:
    """(1 + gap) as float32: how many original steps the decay of a kept token spans."""
    return (1 + gap).float()


def gap_scaled_delta_B(
    delta: torch.Tensor, B: torch.Tensor, gap: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gap-aware decay with an unchanged selective-scan kernel.

    Args:
        delta: (b, E, L) step sizes *after* bias and softplus.
        B: (b, N, L) (or (b, G, N, L)) input matrix.
        gap: (b, L) pruned positions before each token in this scan's direction.

    Returns:
        (delta * (1 + g), B / (1 + g)). The kernel then computes exp((1 + g) delta A) for the decay and
        (1 + g) delta * B / (1 + g) * u = delta B u for the input. This is exact only when delta already
        went through softplus: scale after softplus and run the kernel with delta_softplus=False and no
        delta_bias, since softplus((1 + g) x) != (1 + g) softplus(x).
    """
    L = int(delta.shape[-1])  # a python int also under jit tracing (FLOP counting)
    if gap.dim() != 2 or tuple(int(s) for s in gap.shape) != (int(delta.shape[0]), L) \
            or int(B.shape[0]) != int(delta.shape[0]) or int(B.shape[-1]) != L:
        raise ValueError(f"need delta (b, E, L), B (b, ..., L), gap (b, L) with the same b and L, got "
                         f"{tuple(delta.shape)}, {tuple(B.shape)}, {tuple(gap.shape)}")
    s = gap_scale(gap)
    s_delta = s.view(int(s.shape[0]), *([1] * (delta.dim() - 2)), L).to(delta.dtype)
    s_B = s.view(int(s.shape[0]), *([1] * (B.dim() - 2)), L).to(B.dtype)
    return delta * s_delta, B / s_B


def scatter_to_sequence(x: torch.Tensor, pos: torch.Tensor, seq_len: int, fill: float = 0.0) -> torch.Tensor:
    """Put kept tokens back at their original positions: (B, T, D) -> (B, seq_len, D), others = fill.

    For the masking variant: pruned positions stay in the scan with zero input.
    """
    if x.dim() != 3 or pos.shape != x.shape[:2]:
        raise ValueError(f"x must be (B, T, D) and pos (B, T), got {tuple(x.shape)} and {tuple(pos.shape)}")
    _check_pos(pos, seq_len, strictly_increasing=False)
    B, T, D = (int(s) for s in x.shape)
    if check_values(pos):
        hits = torch.zeros(B, seq_len, dtype=torch.int32, device=x.device)
        hits.scatter_add_(1, pos, torch.ones_like(pos, dtype=torch.int32))
        if bool((hits > 1).any()):
            raise ValueError("pos has a repeated position in a row; each kept token needs its own position")
    return x.new_full((B, seq_len, D), fill).scatter(1, pos[..., None].expand(B, T, D), x)


def gather_from_sequence(y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Read the kept tokens back out of a full-length sequence: (B, L, D) -> (B, T, D)."""
    if y.dim() != 3 or pos.dim() != 2 or pos.shape[0] != y.shape[0]:
        raise ValueError(f"y must be (B, L, D) and pos (B, T), got {tuple(y.shape)} and {tuple(pos.shape)}")
    _check_pos(pos, int(y.shape[1]), strictly_increasing=False)
    return y.gather(1, pos[..., None].expand(*pos.shape, int(y.shape[2])))


def restricted_order(order: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """Visit the kept tokens in the relative order of a full scan order.

    Args:
        order: (L,) long permutation of 0..L-1; order[i] = original position visited at step i.
        kept_positions: (B, T) long original positions of the kept tokens (token order, e.g. ascending).

    Returns:
        perm (B, T) long: ``kept_positions.gather(1, perm)`` lists the kept positions as ``order`` visits
        them; gather the tokens with perm before the scan and undo with ``perm.argsort(dim=1)`` after.
    """
    if order.dim() != 1 or order.dtype != torch.long:
        raise ValueError(f"order must be a 1-D long tensor, got {order.dtype} {tuple(order.shape)}")
    L = int(order.shape[0])
    if check_values(order) and not torch.equal(order.sort().values, torch.arange(L, device=order.device)):
        raise ValueError(f"order must be a permutation of 0..{L - 1}")
    _check_pos(kept_positions, L, strictly_increasing=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(L, device=order.device)
    return torch.sort(rank[kept_positions], dim=1, stable=True).indices
