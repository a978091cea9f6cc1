"""Triton kernels of the fused residual add + RMSNorm (see fused_norm.py). Imported only when Triton is."""
import triton
import triton.language as tl


@triton.jit
def add_rms_fwd(H, R, W, RES, Y, RSTD, n_rows, D, stride_h, stride_r, stride_y, eps,
                HAS_RES: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """res = h (+ r) in fp32; y = res · rsqrt(mean(res²) + eps) · w. One program: BM rows of width D."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(RES + rows[:, None] * D + cols[None, :], x, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=rmask)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def add_rms_bwd(DY, DRES, RES, W, RSTD, DX, DWP, n_rows, D, stride_dy, stride_dres,
                HAS_DRES: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """dx = rstd · (w·dy − x̂ · mean(x̂ · w·dy)) (+ dres), x̂ = res · rstd; per-program partials of dw = Σ dy · x̂."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(RES + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    xhat = x * rstd[:, None]
    wdy = dy * w[None, :]
    c = tl.sum(xhat * wdy, axis=1) / D
    dx = (wdy - xhat * c[:, None]) * rstd[:, None]
    if HAS_DRES:
        dx += tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows[:, None] * D + cols[None, :], dx, mask=mask)
    tl.store(DWP + pid * D + cols, tl.sum(dy * xhat, axis=0), mask=cmask)
