"""Moving per-token values to and from the 2-D patch grid.

Scores live on tokens (B, T) but smoothing needs them on the grid of original patch positions (B, H, W).
Tokens that are not patches (CLS, registers, fused tokens) carry patch index -1 and are skipped.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ...tokens.checks import check_values


def _check_grid(grid) -> Tuple[int, int]:
    if len(tuple(grid)) != 2 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be (H, W) with H, W >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_patch_index(patch_index: torch.Tensor, shape, n_cells: int) -> None:
    if patch_index.dtype != torch.long:
        raise ValueError(f"patch_index must be a long tensor, got dtype {patch_index.dtype}")
    if tuple(int(s) for s in patch_index.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"patch_index must have shape {tuple(shape)}, got {tuple(patch_index.shape)}")
    if check_values(patch_index) and patch_index.numel() and (patch_index.min() < -1 or patch_index.max() >= n_cells):
        raise ValueError(
            f"patch_index values must be -1 (non-patch) or in [0, {n_cells - 1}], "
            f"got range [{int(patch_index.min())}, {int(patch_index.max())}]"
        )


def scatter_to_grid(
    values: torch.Tensor, patch_index: torch.Tensor, grid, fill: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Place token values on the patch grid.

    Args:
        values: (B, T) per-token values.
        patch_index: (B, T) long, grid cell (row-major, 0..H*W-1) of each token, -1 for non-patch tokens.
        grid: (H, W).
        fill: value of cells that no token occupies (pruned patches).

    Returns:
        grid_values (B, H, W) and present_mask (B, H, W) bool (True where a token sits).
        Differentiable w.r.t. ``values``.
    """
    H, W = _check_grid(grid)
    if values.dim() != 2:
        raise ValueError(f"values must be (B, T), got shape {tuple(values.shape)}")
    _check_patch_index(patch_index, values.shape, H * W)
    B = int(values.shape[0])  # a python int also under jit tracing (FLOP counting)
    # Non-patch tokens go to an extra dump cell that is cut off afterwards.
    idx = torch.where(patch_index >= 0, patch_index, torch.full_like(patch_index, H * W))
    flat = values.new_full((B, H * W + 1), fill).scatter(1, idx, values)
    # out-of-place scatter of a tensor (jit tracing, used for FLOP counting, has no bool-scalar scatter_)
    present = torch.zeros(B, H * W + 1, dtype=torch.bool, device=values.device)
    present = present.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))[:, : H * W]
    if check_values(patch_index) and int(present.sum()) != int((patch_index >= 0).sum()):
        raise ValueError("patch_index has the same grid cell twice in a row; each patch may appear once")
    return flat[:, : H * W].reshape(B, H, W), present.reshape(B, H, W)


def gather_from_grid(
    grid_values: torch.Tensor, patch_index: torch.Tensor, fill: float = float("-inf")
) -> torch.Tensor:
    """Read grid values back onto tokens.

    Args:
        grid_values: (B, H, W).
        patch_index: (B, T) long, -1 for non-patch tokens.
        fill: value given to non-patch tokens (-inf keeps them out of a top-k unless protected).

    Returns:
        (B, T) values. Differentiable w.r.t. ``grid_values``.
    """
    if grid_values.dim() != 3:
        raise ValueError(f"grid_values must be (B, H, W), got shape {tuple(grid_values.shape)}")
    B, H, W = (int(s) for s in grid_values.shape)
    if patch_index.dim() != 2 or patch_index.shape[0] != B:
        raise ValueError(f"patch_index must be (B={B}, T), got shape {tuple(patch_index.shape)}")
    _check_patch_index(patch_index, patch_index.shape, H * W)
    out = grid_values.reshape(B, H * W).gather(1, patch_index.clamp(min=0))
    return torch.where(patch_index >= 0, out, torch.full_like(out, fill))
