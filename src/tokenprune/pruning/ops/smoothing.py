"""Score smoothing on the patch grid (PaPr + SS, eq. 1).

    S'_ij = (1/k^2) * sum_{(p,q) in the k x k window centred on (i,j)} S_pq

A mean filter pulls isolated high scores down and fills holes inside objects, so the kept patches form
clusters and the SSM scan sees longer unbroken runs. Everything is one conv2d; no Python loops.

Border rules (what the window sees outside the grid):
  "zero"      zero padding, divide by k^2 (eq. 1 read literally; edges are pulled towards 0)
  "valid"     out-of-grid cells are ignored, divide by the number of in-grid cells
  "replicate" edge values are repeated outwards, divide by k^2

With a mask (True = token still present), absent cells contribute nothing and the divisor is the
(weighted) number of present cells in the window. Out-of-grid cells count as present zeros for "zero",
as absent for "valid" and copy their edge neighbour (value and presence) for "replicate".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BORDERS = ("zero", "valid", "replicate")
KINDS = ("mean", "gaussian")


def smoothing_kernel(kernel_size: int, kind: str = "mean", sigma: Optional[float] = None,
                     dtype=torch.float32, device=None) -> torch.Tensor:
    """Un-normalised (k, k) weights: ones for "mean", exp(-d^2 / 2 sigma^2) for "gaussian".

    sigma defaults to k / 4 (the window then spans about +-2 sigma). Divide by ``.sum()`` to normalise.
    """
    _check_kernel_size(kernel_size)
    if kind not in KINDS:
        raise ValueError(f"unknown smoothing kind {kind!r}; expected one of {KINDS}")
    if kind == "mean":
        return torch.ones(kernel_size, kernel_size, dtype=dtype, device=device)
    sigma = kernel_size / 4.0 if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    d = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(d ** 2) / (2 * sigma ** 2))
    return torch.outer(g, g).to(dtype=dtype, device=device)


def _check_kernel_size(kernel_size) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")


def _conv(x: torch.Tensor, w: torch.Tensor, pad: int, mode: str, value: float) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) correlation with a (k, k) kernel after padding by `pad` on each side."""
    x = x.unsqueeze(1)
    if mode == "replicate":
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    else:
        x = F.pad(x, (pad, pad, pad, pad), mode="constant", value=value)
    return F.conv2d(x, w[None, None]).squeeze(1)


def smooth_scores(
    scores: torch.Tensor,
    kernel_size: int,
    border: str = "zero",
    mask: Optional[torch.Tensor] = None,
    kind: str = "mean",
    sigma: Optional[float] = None,
) -> torch.Tensor:
    """Smooth a score map with a k x k mean (eq. 1) or Gaussian filter.

    Args:
        scores: (B, H, W) score map; any H, W (non-square works).
        kernel_size: odd k >= 1; k = 1 returns the input unchanged (bit-exact).
        border: "zero" | "valid" | "replicate" (see module docstring).
        mask: optional (B, H, W) bool, True = cell present. Absent cells are ignored (masked mean);
            a window with no present cell gives 0. Values at absent cells may be anything, even -inf;
            the output there is unspecified but finite.
        kind: "mean" (eq. 1) or "gaussian" (normalised Gaussian weights, sigma default k / 4).
        sigma: Gaussian standard deviation in cells.

    Returns:
        (B, H, W) smoothed scores, same dtype as ``scores``.
    """
    _check_kernel_size(kernel_size)
    if border not in BORDERS:
        raise ValueError(f"unknown border rule {border!r}; expected one of {BORDERS}")
    if kind not in KINDS:
        raise ValueError(f"unknown smoothing kind {kind!r}; expected one of {KINDS}")
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, H, W), got shape {tuple(scores.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != scores.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(scores.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
    if kernel_size == 1:
        return scores if mask is None else torch.where(mask, scores, torch.zeros_like(scores))

    out_dtype = scores.dtype
    x = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    w = smoothing_kernel(kernel_size, kind, sigma, dtype=x.dtype, device=x.device)
    pad = kernel_size // 2

    if mask is None and border != "valid":
        # Denominator is the full kernel weight (k^2 for the mean): eq. 1 as written.
        out = _conv(x, w, pad, border, 0.0) / w.sum()
        return out.to(out_dtype)

    # Weighted masked mean: sum(w * S * m) / sum(w * m) over the padded window.
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    xm = torch.where(m > 0, x, torch.zeros_like(x))  # absent cells may hold -inf
    num = _conv(xm, w, pad, border, 0.0)
    den = _conv(m, w, pad, border, 1.0 if border == "zero" else 0.0)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(den > 0, num / safe, torch.zeros_like(num))
    return out.to(out_dtype)
