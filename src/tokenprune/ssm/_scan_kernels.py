"""Triton kernels of ``triton_scan`` (module-level: Triton resolves called jit functions through module globals).

Imported only when a kernel is first used, so importing tokenprune never needs Triton; TRITON_INTERPRET is read
when this module is imported.
"""
import triton
import triton.language as tl

# Kernels are defined on first use so that importing this module never needs triton.

@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2·(a1·h + x1) + x2
    return a1 * a2, a2 * x1 + x2

@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

@triton.jit
def _tile_positions(c, L, T: tl.constexpr, REV: tl.constexpr):
    # walking steps c·T .. c·T+T-1 and the sequence positions they visit
    w = c * T + tl.arange(0, T)
    if REV:
        p = L - 1 - w
    else:
        p = w
    return w < L, p

@triton.jit
def _chunk_states(n, A, Bm, C, e, me, p, mt, pid_b, sb_b, sb_n, sc_b, sc_n, dts, dtu, H, n_idx,
                  N: tl.constexpr, A_IS_LOG: tl.constexpr):
    # state n over the chunk, started from column n of the carried states H: (A_n, B_n, C_n, input term, h)
    a_n = tl.load(A + e * N + n, mask=me, other=0.0).to(tl.float32)
    if A_IS_LOG:
        a_n = -tl.exp(a_n)
    b_n = tl.load(Bm + pid_b * sb_b + n * sb_n + p, mask=mt, other=0.0).to(tl.float32)
    c_n = tl.load(C + pid_b * sc_b + n * sc_n + p, mask=mt, other=0.0).to(tl.float32)
    drive = dtu * b_n[None, :]
    ca, cx = tl.associative_scan((tl.exp(dts * a_n[:, None]), drive), 1, _combine)
    h0 = tl.sum(tl.where(n_idx[None, :] == n, H, 0.0), axis=1)
    return a_n, b_n, c_n, drive, cx + ca * h0[:, None]


@triton.jit
def _direction_params(d: tl.constexpr, A0, A1, bias0, bias1, D0, D1):
    # direction 0 uses (A0, bias0, D0), the others (A1, bias1, D1)
    A, bias, D = A1, bias1, D1
    if d == 0:
        A, bias, D = A0, bias0, D0
    return A, bias, D


# ---- forward: one channel per thread --------------------------------------------------------------------------
# A (BE, T) tile with T along the lanes of a warp (what Triton picks for rows that are contiguous along L but not
# aligned, as L = 197 gives; the backward below has it) makes every associative scan and end-of-chunk read a
# shuffle across 32 lanes: compiled for sm_90, ~69 instructions per (token, channel, state) in the forward that
# had it. This forward holds (T, BE) tiles with one channel per lane and the T steps in the thread's registers:
# the scans run sequentially in registers, no shuffles (~14). Loads of u/Δ/z read 32 rows per warp
# instruction, each 32-byte sector reused from L1 over the next steps.

@triton.jit
def _lane_chunk(c, p0, k, L, hrow, hsave, NCHUNK, pid_b, e, me, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm,
                sb_b, sb_n, C, sc_b, sc_n, d_skip, gap, sg_b, y, sy_b, sy_e, z, sz_b, sz_e, idx, si_b, one, SCALE,
                N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr,
                HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, ACCUM: tl.constexpr, FINAL: tl.constexpr,
                HAS_IDX: tl.constexpr, MASKED: tl.constexpr, SAVE: tl.constexpr):
    # steps p0 + k (k = ±arange(T)): scalar row offsets plus constant k, so per-step loads take immediate offsets;
    # only the last, partial chunk (MASKED) pays for masks. The carried states live in hrow (E, N per batch row,
    # fp32 scratch): each thread reads and writes only its own channel's, one load and one store per state
    col = tl.arange(0, T)
    p = p0 + k
    if MASKED:
        mt = (p >= 0) & (p < L)
    else:
        mt = col < T
    # the tiles' positions, multiplied by an opaque 1: without provable contiguity along T, Triton puts the lanes
    # along the channels (dim 1) and the steps in registers
    ph = p * one
    m2 = mt[:, None] & me[None, :]
    if HAS_IDX:
        if MASKED:
            pu = tl.load(idx + (pid_b * si_b + p0) + k, mask=mt, other=0)
        else:
            pu = tl.load(idx + (pid_b * si_b + p0) + k)
        pu = pu * one
    else:
        pu = ph
    u_t = tl.load(u + pid_b * su_b + e[None, :] * su_e + pu[:, None], mask=m2, other=0.0).to(tl.float32)
    d_t = tl.load(dt + pid_b * sd_b + e[None, :] * sd_e + ph[:, None], mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        d_t += d_bias[None, :]
    if SOFTPLUS:
        d_t = _softplus(d_t)
    d_t = tl.where(m2, d_t, 0.0)  # padding steps are the identity: decay 1, input 0
    dtu = d_t * u_t
    if HAS_GAP:
        if MASKED:
            s_t = tl.load(gap + (pid_b * sg_b + p0) + k, mask=mt, other=1.0).to(tl.float32)
        else:
            s_t = tl.load(gap + (pid_b * sg_b + p0) + k).to(tl.float32)
        dts = d_t * s_t[:, None]
    else:
        dts = d_t
    acc = tl.zeros((T, BE), dtype=tl.float32)
    if HAS_D:
        acc += d_skip[None, :] * u_t
    for n in range(N):
        a_n = tl.load(A + e * N + n, mask=me, other=0.0).to(tl.float32)
        if A_IS_LOG:
            a_n = -tl.exp(a_n)
        if MASKED:
            b_n = tl.load(Bm + (pid_b * sb_b + n * sb_n + p0) + k, mask=mt, other=0.0).to(tl.float32)
            c_n = tl.load(C + (pid_b * sc_b + n * sc_n + p0) + k, mask=mt, other=0.0).to(tl.float32)
        else:
            b_n = tl.load(Bm + (pid_b * sb_b + n * sb_n + p0) + k).to(tl.float32)
            c_n = tl.load(C + (pid_b * sc_b + n * sc_n + p0) + k).to(tl.float32)
        ca, cx = tl.associative_scan((tl.exp(dts * a_n[None, :]), dtu * b_n[:, None]), 0, _combine)
        h0 = tl.load(hrow + e * N + n, mask=me, other=0.0)
        if SAVE:  # the state before this chunk, for the backward (the chunked kernel's layout of hchk)
            tl.store(hsave + (e * NCHUNK + c) * N + n, h0, mask=me)
        h = cx + ca * h0[None, :]
        acc += h * c_n[:, None]
        tl.store(hrow + e * N + n, tl.sum(tl.where(col[:, None] == T - 1, h, 0.0), axis=0), mask=me)
    yp = y + pid_b * sy_b + e[None, :] * sy_e + pu[:, None]
    if ACCUM:
        acc += tl.load(yp, mask=m2, other=0.0).to(tl.float32)
    if FINAL:
        acc = acc * SCALE
        if HAS_Z:
            z_t = tl.load(z + pid_b * sz_b + e[None, :] * sz_e + pu[:, None], mask=m2, other=0.0).to(tl.float32)
            acc = acc * z_t / (1.0 + tl.exp(-z_t))
    tl.store(yp, acc.to(y.dtype.element_ty), mask=m2)


@triton.jit
def _lane_direction(pid_b, e, me, L, u, su_b, su_e, dt, sd_b, sd_e, A, bias, Bm, sb_b, sb_n, C, sc_b, sc_n, D,
                    gap, sg_b, y, sy_b, sy_e, z, sz_b, sz_e, idx, si_b, hrow, hsave, NCHUNK, SCALE,
                    N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, REV: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, ACCUM: tl.constexpr,
                    FINAL: tl.constexpr, HAS_IDX: tl.constexpr, SAVE: tl.constexpr):
    n_idx = tl.arange(0, BN)
    tl.store(hrow + e[None, :] * N + n_idx[:, None], tl.zeros((BN, BE), dtype=tl.float32),
             mask=me[None, :] & (n_idx[:, None] < N))  # the states start at zero
    # Triton lays this (N, BE) store out with the lanes along N, so other threads write the zeros than the ones
    # that read a channel's states in the chunk loop (one channel per thread): make the zeros visible first
    tl.debug_barrier()
    d_bias = tl.zeros((BE,), dtype=tl.float32)
    d_skip = tl.zeros((BE,), dtype=tl.float32)
    if HAS_BIAS:
        d_bias = tl.load(bias + e, mask=me, other=0.0).to(tl.float32)
    if HAS_D:
        d_skip = tl.load(D + e, mask=me, other=0.0).to(tl.float32)
    one = L // L
    if REV:
        k = -tl.arange(0, T)
    else:
        k = tl.arange(0, T)
    nfull = L // T
    for c in range(nfull):
        if REV:
            p0 = L - 1 - c * T
        else:
            p0 = c * T
        _lane_chunk(c, p0, k, L, hrow, hsave, NCHUNK, pid_b, e, me, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm, sb_b, sb_n,
                        C, sc_b, sc_n, d_skip, gap, sg_b, y, sy_b, sy_e, z, sz_b, sz_e, idx, si_b, one, SCALE,
                        N, BN, BE, T, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D, HAS_GAP, HAS_Z, ACCUM, FINAL, HAS_IDX,
                        False, SAVE)
    if nfull * T < L:
        if REV:
            p0 = L - 1 - nfull * T
        else:
            p0 = nfull * T
        _lane_chunk(nfull, p0, k, L, hrow, hsave, NCHUNK, pid_b, e, me, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm, sb_b,
                        sb_n, C, sc_b, sc_n, d_skip, gap, sg_b, y, sy_b, sy_e, z, sz_b, sz_e, idx, si_b, one, SCALE,
                        N, BN, BE, T, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D, HAS_GAP, HAS_Z, ACCUM, FINAL, HAS_IDX,
                        True, SAVE)


@triton.jit
def scan_fwd(u, su_d, su_b, su_e, dt, sd_d, sd_b, sd_e, A0, A1, bias0, bias1, Bm, sb_d, sb_b, sb_n,
                   C, sc_d, sc_b, sc_n, D0, D1, gap, sg_d, sg_b, z, sz_b, sz_e, y, sy_b, sy_e, hchk, hscr, idx, si_d,
                   si_b, E, L, NCHUNK, scale,
                   N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, NDIR: tl.constexpr,
                   SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr,
                   HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, SAVE: tl.constexpr, HAS_IDX: tl.constexpr):
    # scan_fwd's arguments and semantics, plus hscr: a (b, E, N) fp32 scratch for the carried states. With SAVE,
    # the state before every chunk goes to hchk (NDIR, b, E, NCHUNK, N) as the chunked forward stores it, so the
    # chunked backward reads it (T must then be the backward's)
    pid_b, pid_e = tl.program_id(0), tl.program_id(1)
    nb = tl.num_programs(0)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    for d in tl.static_range(NDIR):
        if d > 0:
            tl.debug_barrier()  # this direction reads back what the previous one stored (other threads)
        A_d, bias_d, D_d = _direction_params(d, A0, A1, bias0, bias1, D0, D1)
        _lane_direction(pid_b, e, me, L, u + d * su_d, su_b, su_e, dt + d * sd_d, sd_b, sd_e, A_d, bias_d,
                        Bm + d * sb_d, sb_b, sb_n, C + d * sc_d, sc_b, sc_n, D_d, gap + d * sg_d, sg_b,
                        y, sy_b, sy_e, z, sz_b, sz_e, idx + d * si_d, si_b, hscr + pid_b * E * N,
                        hchk + (d * nb + pid_b) * E * NCHUNK * N, NCHUNK, scale,
                        N, BN, BE, T, (d == 1) and not HAS_IDX, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D, HAS_GAP,
                        HAS_Z, d > 0, d == NDIR - 1, HAS_IDX, SAVE)


@triton.jit
def _bwd_direction(pid_b, pid_e, e, me, L, NCHUNK, NEB, u, su_b, su_e, dt, sd_b, sd_e, A, bias, Bm, sb_b,
                   sb_n, C, sc_b, sc_n, D, gap, sg_b, hchk, gout, sgo_b, sgo_e, z, sz_b, sz_e, idx, si_b,
                   du, ddt, dz, dBp, dCp, dAp, dDp, dbiasp, E, SCALE,
                   N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, REV: tl.constexpr,
                   SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
                   HAS_D: tl.constexpr, HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, ACCUM_DZ: tl.constexpr,
                   HAS_IDX: tl.constexpr):
    # du/ddt/dz: (b, E, L) contiguous; dBp/dCp: (b, NEB, N, L); dAp: (b, E, N); dDp/dbiasp: (b, E)
    # with HAS_IDX, u/gout/z/du/dz are at token idx[p] of step p, Δ/B/C/gap and their gradients at step p
    n_idx = tl.arange(0, BN)
    col = tl.arange(0, T)
    mn2 = me[:, None] & (n_idx[None, :] < N)
    G = tl.zeros((BE, BN), dtype=tl.float32)   # dL/dh at the first step after the current chunk
    dA = tl.zeros((BE, BN), dtype=tl.float32)
    dD = tl.zeros((BE,), dtype=tl.float32)
    dbias = tl.zeros((BE,), dtype=tl.float32)
    if HAS_BIAS:
        d_bias = tl.load(bias + e, mask=me, other=0.0).to(tl.float32)
    if HAS_D:
        d_skip = tl.load(D + e, mask=me, other=0.0).to(tl.float32)
    for i in range(NCHUNK):
        c = NCHUNK - 1 - i
        mt, p = _tile_positions(c, L, T, REV)
        m2 = me[:, None] & mt[None, :]
        # the next step in walking order (its decay a_{t+1} carries dh back to step t)
        if REV:
            pn = p - 1
        else:
            pn = p + 1
        mtn = (c * T + col + 1) < L
        m2n = me[:, None] & mtn[None, :]
        if HAS_IDX:
            pu = tl.load(idx + pid_b * si_b + p, mask=mt, other=0)
        else:
            pu = p
        u_t = tl.load(u + pid_b * su_b + e[:, None] * su_e + pu[None, :], mask=m2, other=0.0).to(tl.float32)
        r_t = tl.load(dt + pid_b * sd_b + e[:, None] * sd_e + p[None, :], mask=m2, other=0.0).to(tl.float32)
        r_n = tl.load(dt + pid_b * sd_b + e[:, None] * sd_e + pn[None, :], mask=m2n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            r_t += d_bias[:, None]
            r_n += d_bias[:, None]
        if SOFTPLUS:
            d_t = _softplus(r_t)
            d_n = _softplus(r_n)
        else:
            d_t = r_t
            d_n = r_n
        d_t = tl.where(m2, d_t, 0.0)
        d_n = tl.where(m2n, d_n, 0.0)
        dtu = d_t * u_t
        if HAS_GAP:
            s_t = tl.load(gap + pid_b * sg_b + p, mask=mt, other=1.0).to(tl.float32)
            s_n = tl.load(gap + pid_b * sg_b + pn, mask=mtn, other=1.0).to(tl.float32)
            s2 = s_t[None, :] + tl.zeros((BE, T), dtype=tl.float32)
            dts = d_t * s2
            dtsn = d_n * s_n[None, :]
        else:
            s2 = tl.full((BE, T), 1.0, dtype=tl.float32)
            dts = d_t
            dtsn = d_n
        go = tl.load(gout + pid_b * sgo_b + e[:, None] * sgo_e + pu[None, :], mask=m2, other=0.0).to(tl.float32)
        go = go * SCALE
        if HAS_Z:
            z_t = tl.load(z + pid_b * sz_b + e[:, None] * sz_e + pu[None, :], mask=m2, other=0.0).to(tl.float32)
            sig_z = 1.0 / (1.0 + tl.exp(-z_t))
            gy = go * z_t * sig_z
        else:
            gy = go
        Hc = tl.load(hchk + ((pid_b * E + e[:, None]) * NCHUNK + c) * N + n_idx[None, :], mask=mn2, other=0.0)
        y_acc = tl.zeros((BE, T), dtype=tl.float32)
        g_ddt = tl.zeros((BE, T), dtype=tl.float32)
        g_du = tl.zeros((BE, T), dtype=tl.float32)
        part = ((pid_b * NEB + pid_e) * N) * L
        for n in range(N):
            a_n, b_n, c_n, drive, h = _chunk_states(n, A, Bm, C, e, me, p, mt, pid_b, sb_b, sb_n, sc_b, sc_n,
                                                    dts, dtu, Hc, n_idx, N, A_IS_LOG)
            y_acc += h * c_n[None, :]
            # reverse recurrence: dh_t = C_t g_t + a_{t+1} dh_{t+1}, a_{t+1} = 0 past the sequence end
            a_next = tl.where(m2n, tl.exp(dtsn * a_n[:, None]), 0.0)
            ga, gx = tl.associative_scan((a_next, gy * c_n[None, :]), 1, _combine, reverse=True)
            g_in = tl.sum(tl.where(n_idx[None, :] == n, G, 0.0), axis=1)
            dh = gx + ga * g_in[:, None]
            G = tl.where(n_idx[None, :] == n, tl.sum(tl.where(col[None, :] == 0, dh, 0.0), axis=1)[:, None], G)
            dh = tl.where(m2, dh, 0.0)
            hx = dh * (h - drive)                     # dh_t · a_t h_{t-1}
            g_ddt += dh * u_t * b_n[None, :] + hx * a_n[:, None] * s2
            g_du += dh * b_n[None, :]
            dA_n = tl.sum(hx * dts, axis=1)
            if A_IS_LOG:
                dA_n = dA_n * a_n
            dA += tl.where(n_idx[None, :] == n, dA_n[:, None], 0.0)
            tl.store(dBp + part + n * L + p, tl.sum(dh * dtu, axis=0), mask=mt)
            tl.store(dCp + part + n * L + p, tl.sum(gy * h, axis=0), mask=mt)
        g_du = g_du * d_t
        if HAS_D:
            y_acc += d_skip[:, None] * u_t
            g_du += gy * d_skip[:, None]
            dD += tl.sum(tl.where(m2, gy * u_t, 0.0), axis=1)
        if SOFTPLUS:
            g_ddt = g_ddt / (1.0 + tl.exp(-r_t))
        g_ddt = tl.where(m2, g_ddt, 0.0)
        if HAS_BIAS:
            dbias += tl.sum(g_ddt, axis=1)
        off = (pid_b * E + e[:, None]) * L + p[None, :]
        off_u = (pid_b * E + e[:, None]) * L + pu[None, :]
        tl.store(du + off_u, g_du, mask=m2)
        tl.store(ddt + off, g_ddt, mask=m2)
        if HAS_Z:
            gz = go * y_acc * sig_z * (1.0 + z_t * (1.0 - sig_z))
            if ACCUM_DZ:
                gz += tl.load(dz + off_u, mask=m2, other=0.0)
            tl.store(dz + off_u, gz, mask=m2)
    tl.store(dAp + (pid_b * E + e[:, None]) * N + n_idx[None, :], dA, mask=mn2)
    if HAS_D:
        tl.store(dDp + pid_b * E + e, dD, mask=me)
    if HAS_BIAS:
        tl.store(dbiasp + pid_b * E + e, dbias, mask=me)

@triton.jit
def scan_bwd(u, su_d, su_b, su_e, dt, sd_d, sd_b, sd_e, A0, A1, bias0, bias1, Bm, sb_d, sb_b, sb_n,
             C, sc_d, sc_b, sc_n, D0, D1, gap, sg_d, sg_b, z, sz_b, sz_e, gout, sgo_b, sgo_e, hchk, idx, si_d, si_b,
             du, ddt, dz, dBp, dCp, dAp, dDp, dbiasp, E, L, NCHUNK, NEB, scale,
             N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, NDIR: tl.constexpr,
             SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr,
             HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, HAS_IDX: tl.constexpr):
    pid_b, pid_e = tl.program_id(0), tl.program_id(1)
    nb = tl.num_programs(0)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    sz_grad = nb * E * L
    for d in tl.static_range(NDIR):
        if d > 0:
            tl.debug_barrier()  # this direction adds to dz what the previous one stored, in another tile order
        A_d, bias_d, D_d = _direction_params(d, A0, A1, bias0, bias1, D0, D1)
        _bwd_direction(pid_b, pid_e, e, me, L, NCHUNK, NEB, u + d * su_d, su_b, su_e, dt + d * sd_d, sd_b, sd_e,
                       A_d, bias_d, Bm + d * sb_d, sb_b, sb_n, C + d * sc_d, sc_b, sc_n, D_d, gap + d * sg_d, sg_b,
                       hchk + d * nb * E * NCHUNK * N, gout, sgo_b, sgo_e, z, sz_b, sz_e, idx + d * si_d, si_b,
                       du + d * sz_grad, ddt + d * sz_grad, dz, dBp + d * nb * NEB * N * L,
                       dCp + d * nb * NEB * N * L, dAp + d * nb * E * N, dDp + d * nb * E, dbiasp + d * nb * E, E,
                       scale, N, BN, BE, T, (d == 1) and not HAS_IDX, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D,
                       HAS_GAP, HAS_Z, d > 0, HAS_IDX)
