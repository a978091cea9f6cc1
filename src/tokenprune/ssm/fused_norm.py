"""The residual add + RMSNorm of a Mamba block as one Triton kernel, a ``torch.library`` custom op.

Why: written out in torch, ``residual + h`` then fp32 RMSNorm is seven kernels per block (add, pow, mean,
add, rsqrt, mul, mul) over the whole hidden state; ViM runs 24 of them per forward. Fused, each block reads h
and the residual once and writes the fp32 residual and the normalised input of the mixer once, already in the
dtype the mixer's matmul consumes under autocast (no cast kernel after it). mamba-ssm fuses the same add + norm
(its ``fused_add_norm`` path) for the official ViM.

``add_rms_norm(h, residual, weight, eps, out_dtype)`` -> (y, residual_out):
    residual_out = h (+ residual), fp32;  y = residual_out · rsqrt(mean(residual_out²) + eps) · weight.
The backward is one kernel too (per-program partials of the weight gradient, summed by torch: no atomics).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .triton_scan import LAUNCH_OPTIONS


def kernels():
    """(add_rms_fwd, add_rms_bwd) Triton kernels."""
    from . import _norm_kernels as k
    return k.add_rms_fwd, k.add_rms_bwd


def _tile(D: int) -> Tuple[int, int]:
    """(rows per program, padded width): about 4k elements per program, whole rows (the norm reduces a row)."""
    import triton
    bd = triton.next_power_of_2(D)
    return max(1, 4096 // bd), bd


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("tokenprune::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(h: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y in out_dtype, residual_out fp32, rstd (rows,) fp32), y and residual_out shaped like h."""
    import triton
    D = h.shape[-1]
    h2 = _rows(h)
    r2 = None if residual is None else _rows(residual)
    n = h2.shape[0]
    res = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    y = torch.empty(h.shape, dtype=out_dtype, device=h.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=h.device)
    bm, bd = _tile(D)
    fwd, _ = kernels()
    fwd[(triton.cdiv(n, bm),)](h2, r2 if r2 is not None else h2, weight, res, y, rstd, n, D, h2.stride(0),
                               r2.stride(0) if r2 is not None else 0, D, float(eps),
                               HAS_RES=r2 is not None, BM=bm, BD=bd, **LAUNCH_OPTIONS)
    return y, res, rstd


@add_rms_norm_fwd.register_fake
def _(h, residual, weight, eps, out_dtype):
    n = h.numel() // h.shape[-1] if h.shape[-1] else 0
    return (h.new_empty(h.shape, dtype=out_dtype), h.new_empty(h.shape, dtype=torch.float32),
            h.new_empty((n,), dtype=torch.float32))


@torch.library.custom_op("tokenprune::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(dy: torch.Tensor, dres: Optional[torch.Tensor], res: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor) -> List[torch.Tensor]:
    """[d(residual_out input) fp32 shaped like res, dweight (D,) fp32]."""
    import triton
    D = res.shape[-1]
    dy2 = _rows(dy)
    dr2 = None if dres is None else _rows(dres)
    n = dy2.shape[0]
    bm, bd = _tile(D)
    grid = triton.cdiv(n, bm)
    dx = torch.empty(res.shape, dtype=torch.float32, device=res.device)
    dwp = torch.empty((grid, D), dtype=torch.float32, device=res.device)
    _, bwd = kernels()
    bwd[(grid,)](dy2, dr2 if dr2 is not None else dy2, res, weight, rstd, dx, dwp, n, D, dy2.stride(0),
                 dr2.stride(0) if dr2 is not None else 0, HAS_DRES=dr2 is not None, BM=bm, BD=bd,
                 **LAUNCH_OPTIONS)
    return [dx, dwp.sum(0)]


@add_rms_norm_bwd.register_fake
def _(dy, dres, res, weight, rstd):
    return [res.new_empty(res.shape, dtype=torch.float32), res.new_empty((res.shape[-1],), dtype=torch.float32)]


def _setup(ctx, inputs, output):
    h, residual, weight, eps, out_dtype = inputs
    ctx.dtypes = (h.dtype, None if residual is None else residual.dtype, weight.dtype)
    ctx.save_for_backward(output[1], weight, output[2])


def _backward(ctx, gy, gres, _grstd):
    res, weight, rstd = ctx.saved_tensors
    dx, dw = add_rms_norm_bwd(gy, gres, res, weight, rstd)
    h_dtype, r_dtype, w_dtype = ctx.dtypes
    return dx.to(h_dtype), None if r_dtype is None else dx.to(r_dtype), dw.to(w_dtype), None, None


torch.library.register_autograd("tokenprune::add_rms_norm_fwd", _backward, setup_context=_setup)


def add_rms_norm(h: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-5,
                 out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h + residual) in ``out_dtype`` (default weight's), h + residual in fp32); residual may be None
    (the first block). See the module docstring."""
    D = h.shape[-1]
    if h.dim() < 2 or D == 0:
        raise ValueError(f"add_rms_norm: h must be (..., D) with D > 0, got shape {tuple(h.shape)}")
    if tuple(weight.shape) != (D,):
        raise ValueError(f"add_rms_norm: weight has shape {tuple(weight.shape)}, expected ({D},)")
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"add_rms_norm: residual has shape {tuple(residual.shape)}, expected h's "
                         f"{tuple(h.shape)}")
    for name, t in (("h", h), ("residual", residual), ("weight", weight)):
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"add_rms_norm: {name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    y, res, _ = add_rms_norm_fwd(h, residual, weight, float(eps), out_dtype or weight.dtype)
    return y, res
