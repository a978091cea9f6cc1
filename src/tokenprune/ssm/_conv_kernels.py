"""Triton kernels of ``triton_conv`` (module-level: Triton resolves called jit functions through module globals).

Imported only when a kernel is first used, so importing tokenprune never needs Triton; TRITON_INTERPRET is read
when this module is imported.
"""
import triton
import triton.language as tl

@triton.jit
def _tap(x, sx_b, sx_e, pid_b, e, me, q, L, k, K: tl.constexpr, ANTI: tl.constexpr):
    # x at the positions tap k of the conv reads for outputs q: q -/+ (K-1-k), zero outside [0, L)
    if ANTI:
        src = q + (K - 1 - k)
    else:
        src = q - (K - 1 - k)
    m = me[:, None] & ((src >= 0) & (src < L))[None, :]
    return tl.load(x + pid_b * sx_b + e[:, None] * sx_e + src[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _pre(x, sx_b, sx_e, pid_b, e, me, q, L, w, bias, K: tl.constexpr, ANTI: tl.constexpr,
         BE: tl.constexpr, T: tl.constexpr):
    # pre-activation at positions q (T,) for channels e (BE,)
    acc = tl.zeros((BE, T), dtype=tl.float32)
    for k in tl.static_range(K):
        wk = tl.load(w + e * K + k, mask=me, other=0.0).to(tl.float32)
        acc += wk[:, None] * _tap(x, sx_b, sx_e, pid_b, e, me, q, L, k, K, ANTI)
    return acc + tl.load(bias + e, mask=me, other=0.0).to(tl.float32)[:, None]

@triton.jit
def conv_fwd(x, sx_b, sx_e, w0, b0, w1, b1, out, so_d, so_b, so_e, E, L,
             K: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, NDIR: tl.constexpr):
    pid_b, pid_e, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    p = pid_t * T + tl.arange(0, T)
    m2 = me[:, None] & (p < L)[None, :]
    off = pid_b * so_b + e[:, None] * so_e + p[None, :]
    pre = _pre(x, sx_b, sx_e, pid_b, e, me, p, L, w0, b0, K, False, BE, T)
    tl.store(out + off, (pre / (1.0 + tl.exp(-pre))).to(out.dtype.element_ty), mask=m2)
    if NDIR == 2:
        pre = _pre(x, sx_b, sx_e, pid_b, e, me, p, L, w1, b1, K, True, BE, T)
        tl.store(out + so_d + off, (pre / (1.0 + tl.exp(-pre))).to(out.dtype.element_ty), mask=m2)

@triton.jit
def _bwd_direction(x, sx_b, sx_e, g, sg_b, sg_e, pid_b, e, me, p, L, w, bias, dwp, dbp,
                   K: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, ANTI: tl.constexpr):
    # returns this direction's contribution to dx at positions p; writes dW/dbias partials
    dx = tl.zeros((BE, T), dtype=tl.float32)
    for k in range(K):  # a loop, not unrolled: unrolled, the K x K shifted loads spill registers on sm_90
        # out[q] uses x[p] through tap k when q = p + (K-1-k) (causal) or p - (K-1-k) (anti-causal)
        if ANTI:
            q = p - (K - 1 - k)
        else:
            q = p + (K - 1 - k)
        mq = me[:, None] & ((q >= 0) & (q < L))[None, :]
        pre = _pre(x, sx_b, sx_e, pid_b, e, me, q, L, w, bias, K, ANTI, BE, T)
        sg = 1.0 / (1.0 + tl.exp(-pre))
        gq = tl.load(g + pid_b * sg_b + e[:, None] * sg_e + q[None, :], mask=mq, other=0.0).to(tl.float32)
        dpre = tl.where(mq, gq * sg * (1.0 + pre * (1.0 - sg)), 0.0)
        wk = tl.load(w + e * K + k, mask=me, other=0.0).to(tl.float32)
        dx += wk[:, None] * dpre
    # weight/bias grads from the unshifted positions: dW[k] = sum_t dpre[t] x[t -/+ (K-1-k)]
    mp = me[:, None] & (p < L)[None, :]
    pre = _pre(x, sx_b, sx_e, pid_b, e, me, p, L, w, bias, K, ANTI, BE, T)
    sg = 1.0 / (1.0 + tl.exp(-pre))
    gp = tl.load(g + pid_b * sg_b + e[:, None] * sg_e + p[None, :], mask=mp, other=0.0).to(tl.float32)
    dpre = tl.where(mp, gp * sg * (1.0 + pre * (1.0 - sg)), 0.0)
    for k in tl.static_range(K):
        xv = _tap(x, sx_b, sx_e, pid_b, e, me, p, L, k, K, ANTI)
        tl.store(dwp + e * K + k, tl.sum(dpre * xv, axis=1), mask=me)
    tl.store(dbp + e, tl.sum(dpre, axis=1), mask=me)
    return dx

@triton.jit
def conv_bwd(x, sx_b, sx_e, w0, b0, w1, b1, g, sg_d, sg_b, sg_e, dx, sdx_b, sdx_e, dwp, dbp, E, L, NPROG,
             K: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, NDIR: tl.constexpr):
    # dwp: (NDIR, NPROG, E, K) partials, dbp: (NDIR, NPROG, E), NPROG = b * number of L tiles
    pid_b, pid_e, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    prog = pid_b * tl.num_programs(2) + pid_t
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    p = pid_t * T + tl.arange(0, T)
    acc = _bwd_direction(x, sx_b, sx_e, g, sg_b, sg_e, pid_b, e, me, p, L, w0, b0,
                         dwp + prog * E * K, dbp + prog * E, K, BE, T, False)
    if NDIR == 2:
        acc += _bwd_direction(x, sx_b, sx_e, g + sg_d, sg_b, sg_e, pid_b, e, me, p, L, w1, b1,
                              dwp + (NPROG + prog) * E * K, dbp + (NPROG + prog) * E, K, BE, T, True)
    m2 = me[:, None] & (p < L)[None, :]
    tl.store(dx + pid_b * sdx_b + e[:, None] * sdx_e + p[None, :], acc.to(dx.dtype.element_ty), mask=m2)
