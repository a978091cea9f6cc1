"""PlainMamba's four continuous zig-zag ("snake") scan orders, and what they become after pruning.

Positions are raster indices ``r = row * W + col`` of the H x W patch grid. Each order is a permutation
``order[step] = position visited at that step``; each step carries a direction label (the learned vectors
``direction_Bs`` of the mixer are indexed by it):

    0 start (first step)   1 right   2 left   3 up   4 down

The label of a step is the direction of the move *into* the token visited at that step (so step 0 is
"start"). The four orders, as in the official model:

    0: rows top -> bottom, row 0 left -> right, alternating (moves right / left / down)
    1: rows bottom -> top, snake; starts at the bottom-right corner when H is odd, else at the
       bottom-left one (moves right / left / up)
    2: columns left -> right, column 0 top -> bottom, alternating (moves down / up / right)
    3: columns right -> left, snake; starts at the bottom-right corner when W is odd, else top-right
       (moves down / up / left)

After pruning, every order visits the kept tokens in the relative order of the full scan
(``restricted_scan``). Each kept token keeps the direction label of the step that entered it in the full
scan (see docs/plainmamba.md: this is also what the "mask" alignment gives the kept tokens, so the three
alignment variants agree on labels), and the gap before it in that order is the number of pruned
positions the full scan visits between the previous kept token and it (for the first kept token: the pruned
positions visited before it).
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

from ..tokens.checks import check_values
from ..tokens.sequence import restricted_order, scan_gaps

START, RIGHT, LEFT, UP, DOWN = 0, 1, 2, 3, 4
DIRECTION_NAMES = ("start", "right", "left", "up", "down")
NUM_DIRECTION_LABELS = 5
NUM_ORDERS = 4


def _move_label(prev: Tuple[int, int], cur: Tuple[int, int]) -> int:
    dr, dc = cur[0] - prev[0], cur[1] - prev[1]
    labels = {(0, 1): RIGHT, (0, -1): LEFT, (-1, 0): UP, (1, 0): DOWN}
    if (dr, dc) not in labels:
        raise AssertionError(f"zig-zag step from {prev} to {cur} is not between grid neighbours")
    return labels[(dr, dc)]


def _snake(lines: List[int], line_len: int, first_forward: bool, by_rows: bool, W: int) -> List[int]:
    """Visit `lines` (rows or columns) in the given sequence, reversing direction on every line."""
    out, forward = [], first_forward
    for line in lines:
        along = range(line_len) if forward else range(line_len - 1, -1, -1)
        for k in along:
            r, c = (line, k) if by_rows else (k, line)
            out.append(r * W + c)
        forward = not forward
    return out


def zigzag_orders(H: int, W: int) -> List[List[int]]:
    """The four zig-zag orders of an H x W grid (lists of raster positions)."""
    if H < 1 or W < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {H} x {W}")
    rows_down, rows_up = list(range(H)), list(range(H - 1, -1, -1))
    cols_right, cols_left = list(range(W)), list(range(W - 1, -1, -1))
    return [
        _snake(rows_down, W, True, True, W),
        # bottom row first; its direction is chosen so the snake starts at the right corner for odd H
        _snake(rows_up, W, H % 2 == 0, True, W),
        _snake(cols_right, H, True, False, W),
        # rightmost column first; starts at the bottom for odd W, at the top for even W
        _snake(cols_left, H, W % 2 == 0, False, W),
    ]


def direction_labels(order: List[int], W: int) -> List[int]:
    """Label of each step of an order: START for step 0, else the move from the previous position."""
    coords = [divmod(p, W) for p in order]
    return [START] + [_move_label(coords[i - 1], coords[i]) for i in range(1, len(coords))]


def scan_tables(H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(orders, inverse, labels), each (4, H*W) long.

    orders[k, step] = position; inverse[k, position] = step; labels[k, step] = direction label.
    """
    orders = zigzag_orders(H, W)
    order_t = torch.tensor(orders, dtype=torch.long)
    inverse = torch.empty_like(order_t)
    steps = torch.arange(H * W, dtype=torch.long)
    for k in range(NUM_ORDERS):
        inverse[k, order_t[k]] = steps
    labels = torch.tensor([direction_labels(o, W) for o in orders], dtype=torch.long)
    return order_t, inverse, labels


class RestrictedScan(NamedTuple):
    """One scan order restricted to the kept tokens of each image (all (B, T) long).

    perm[b, j]: token index (into the current token order) visited at restricted step j;
    inverse[b, t]: restricted step at which token t is visited (perm's inverse);
    labels[b, j]: direction label of restricted step j (the kept token's label in the full scan);
    gaps[b, j]: pruned positions the full scan visits between restricted steps j-1 and j
    (before the first kept token for j = 0).
    """
    perm: torch.Tensor
    inverse: torch.Tensor
    labels: torch.Tensor
    gaps: torch.Tensor


def restricted_scan(pos: torch.Tensor, order_inverse: torch.Tensor, labels: torch.Tensor) -> RestrictedScan:
    """Restrict one full order to the kept tokens at raster positions `pos` (B, T).

    Args:
        pos: (B, T) long raster positions of the current tokens (distinct per row, any order).
        order_inverse: (L,) long, full-scan step of each raster position.
        labels: (L,) long, direction label of each full-scan step.
    """
    perm = restricted_order(torch.argsort(order_inverse), pos)
    sorted_steps = order_inverse[pos].gather(1, perm)  # full-scan steps the restricted scan visits, ascending
    gaps, _ = scan_gaps(sorted_steps, int(order_inverse.shape[0]))
    return RestrictedScan(perm, torch.argsort(perm, dim=1), labels[sorted_steps], gaps)


def restricted_scan_tables(pos: torch.Tensor, inverse: torch.Tensor, labels: torch.Tensor) -> RestrictedScan:
    """Every order restricted to the kept tokens at once: a RestrictedScan whose fields are (K, B, T), K orders
    (inverse, labels: (K, L) tables from scan_tables). The full-scan step of every kept token is a lookup in
    ``inverse`` (an order's inverse is its rank table), and one sort along the tokens gives both the restricted
    order and the steps it visits, ascending: a handful of launches per pruning stage, whatever K (ToMe
    recomputes this after every block)."""
    if pos.dim() != 2 or pos.dtype != torch.long:
        raise ValueError(f"pos must be a (B, T) long tensor, got {pos.dtype} {tuple(pos.shape)}")
    K, L = (int(s) for s in inverse.shape)
    B, T = (int(s) for s in pos.shape)
    if check_values(pos) and pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= L):
        raise ValueError(f"PlainMamba token positions must be raster indices in [0, {L - 1}], got range "
                         f"[{int(pos.min())}, {int(pos.max())}] (fused tokens without a grid position, as "
                         "EViT makes, are not supported)")
    steps = inverse.index_select(1, pos.reshape(-1)).view(K, B, T)  # full-scan step of each token, per order
    # the steps of a row are distinct (positions are), so the sort's order is unique: as restricted_order's
    sorted_steps, perm = steps.sort(dim=-1)
    step_labels = labels.gather(1, sorted_steps.view(K, B * T)).view(K, B, T)
    # pruned positions before each visited step: the first one's step itself, then the difference minus one
    gaps = torch.diff(sorted_steps, dim=-1, prepend=sorted_steps.new_full((K, B, 1), -1)) - 1
    return RestrictedScan(perm, perm.argsort(dim=-1), step_labels, gaps)


def per_order(tables: RestrictedScan) -> List[RestrictedScan]:
    """The K per-order RestrictedScans of ``restricted_scan_tables``' (K, B, T) fields, as (B, T) views."""
    return [RestrictedScan(*fields) for fields in zip(*(t.unbind(0) for t in tables))]


def restricted_scans(pos: torch.Tensor, inverse: torch.Tensor, labels: torch.Tensor) -> List[RestrictedScan]:
    """restricted_scan for each of the K orders: the (B, T) views of ``restricted_scan_tables``."""
    return per_order(restricted_scan_tables(pos, inverse, labels))
