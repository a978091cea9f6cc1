"""Triton kernels of ``triton_scan`` (module-level: Triton resolves called jit functions through module globals).

Imported only when a kernel is first used, so importing tokenprune never needs Triton; TRITON_INTERPRET is read
when this module is imported.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


def _transposed_tiles() -> bool:
    """Whether the (T, BE) tiles are loaded and stored as (BE, T) and transposed in registers (free: a permuted
    layout). Triton's coalescing pass orders a tile's dimensions by provable contiguity, and these tiles have
    none in either (the steps are made opaque, the channels are strided); on a tie Triton 3.6 and older put the
    lanes along the first dimension, 3.8 along the last. The scans need the lanes along the channels and the
    steps in registers: with the other order every associative scan and row pick became lane shuffles (sm_90
    SASS of the forward's loop: 42 instructions per (token, channel, state) and spills under Triton 3.6.0, 8
    under 3.8.0). TOKENPRUNE_SCAN_TRANSPOSED_TILES=0/1 overrides (tests run both paths)."""
    import os
    forced = os.environ.get("TOKENPRUNE_SCAN_TRANSPOSED_TILES", "")
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"TOKENPRUNE_SCAN_TRANSPOSED_TILES={forced!r}; expected 0 or 1")
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) < LANES_LAST_ON_TIES


LANES_LAST_ON_TIES = (3, 7)  # the first Triton version whose coalescing puts the lanes along the last dimension
TRANSPOSED = tl.constexpr(_transposed_tiles())


@triton.jit
def _tile_ptr(base, e, se, pos):
    # addresses of a (T, BE) tile, steps `pos` down and channels e (stride se) across; built as (BE, T) when
    # TRANSPOSED, so that the load's coalesced layout has the lanes along the channels (see _transposed_tiles)
    if TRANSPOSED:
        return base + e[:, None] * se + pos[None, :]
    else:
        return base + e[None, :] * se + pos[:, None]


@triton.jit
def _tile_mask(mt, me):
    # the memory mask of _tile_ptr's tile: steps mt, channels me
    if TRANSPOSED:
        return me[:, None] & mt[None, :]
    else:
        return mt[:, None] & me[None, :]


@triton.jit
def _tile_load(ptr, mask):
    # a _tile_ptr tile as a (T, BE) fp32 tensor
    x = tl.load(ptr, mask=mask, other=0.0)
    if TRANSPOSED:
        x = tl.trans(x)
    return x.to(tl.float32)


@triton.jit
def _tile_store(ptr, x, mask):
    # a (T, BE) tensor into a _tile_ptr tile
    if TRANSPOSED:
        x = tl.trans(x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)

# Kernels are defined on first use so that importing this module never needs triton.

@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2·(a1·h + x1) + x2
    return a1 * a2, a2 * x1 + x2

@triton.jit
def _decay(x2, FAST: tl.constexpr):
    # 2^x2 for the decays exp(Δ·A) = 2^(Δ·A·log2 e), A pre-scaled. FAST (compiled for a GPU): one ex2.approx.ftz
    # instruction; tl.exp2 lowers to the non-ftz ex2, which ptxas wraps in a range test and two scalings for
    # results below 2^-126 (~6 instructions each, two decays per (token, channel, state) in the backward, seen
    # in the sm_90 SASS). Flushing such decays to 0 changes no state by more than 2^-126 of its input
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x2], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x2)


@triton.jit
def _neg_zero(shape):
    # -0.0, the identity of +: sums of selects whose condition is known per register then fold to one operand
    # (no instruction). Made by a bitcast, since Triton turns a -0.0 literal into +0.0, and x + 0.0 does not fold
    return tl.full(shape, -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _pick_row(x, j):
    # row j of a (T, BE) tile whose rows are a thread's own registers, as (BE,): free (see _neg_zero)
    col = tl.arange(0, x.shape[0])[:, None]
    return tl.sum(tl.where(col == j, x, _neg_zero(x.shape)), axis=0)


@triton.jit
def _seed_first(x, a, h0):
    # x with a·h0 added to its first row (step): an associative scan of (a, x) then gives the recurrence started
    # from h0 (BE,), without the cumulative products of a
    col = tl.arange(0, x.shape[0])[:, None]
    return tl.where(col == 0, x + a * h0[None, :], x)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _delta(ptr, mask, d_bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, TILE: tl.constexpr):
    # Δ of a (T, BE) tile (TILE: _tile_ptr addresses and mask) or of one step's (BE,) row, as (1, BE): the raw
    # input plus the channel bias, through softplus
    if TILE:
        d = _tile_load(ptr, mask)
    else:
        d = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        d += d_bias[None, :]
    if SOFTPLUS:
        d = _softplus(d)
    return d

@triton.jit
def _state_rows(n, A, e, me, Bm, sb_b, sb_n, C, sc_b, sc_n, pid_b, p0, k, mt, N: tl.constexpr,
                A_IS_LOG: tl.constexpr, MASKED: tl.constexpr):
    # state n's inputs for a chunk at steps p0 + k: A_n per channel, A_n·log2(e) for _decay, the B and C rows
    # (masked only in the partial chunk, so the others load at immediate offsets)
    a_n = tl.load(A + e * N + n, mask=me, other=0.0).to(tl.float32)
    if A_IS_LOG:
        a_n = -tl.exp(a_n)
    if MASKED:
        b_n = tl.load(Bm + (pid_b * sb_b + n * sb_n + p0) + k, mask=mt, other=0.0).to(tl.float32)
        c_n = tl.load(C + (pid_b * sc_b + n * sc_n + p0) + k, mask=mt, other=0.0).to(tl.float32)
    else:
        b_n = tl.load(Bm + (pid_b * sb_b + n * sb_n + p0) + k).to(tl.float32)
        c_n = tl.load(C + (pid_b * sc_b + n * sc_n + p0) + k).to(tl.float32)
    return a_n, a_n * LOG2E, b_n, c_n


@triton.jit
def _direction_params(d: tl.constexpr, A0, A1, bias0, bias1, D0, D1):
    # direction 0 uses (A0, bias0, D0), the others (A1, bias1, D1)
    A, bias, D = A1, bias1, D1
    if d == 0:
        A, bias, D = A0, bias0, D0
    return A, bias, D


# ---- forward: one channel per thread --------------------------------------------------------------------------
# A (BE, T) tile with T along the lanes of a warp (what Triton picks for rows that are contiguous along L but not
# aligned, as L = 197 gives) makes every associative scan and end-of-chunk read a shuffle across 32 lanes:
# compiled for sm_90, ~69 instructions per (token, channel, state) in the forward that had it. This forward
# holds (T, BE) tiles with one channel per lane and the T steps in the thread's registers: the scans run
# sequentially in registers, no shuffles (~8 with the ex2.approx decays and the carried state seeded into the
# scan). Loads of u/Δ/z read 32 rows per warp instruction, each 32-byte sector reused from L1 over the next steps.

@triton.jit
def _lane_chunk(c, p0, k, L, hrow, hsave, NCHUNK, pid_b, e, me, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm,
                sb_b, sb_n, C, sc_b, sc_n, d_skip, gap, sg_b, y, sy_b, sy_e, z, sz_b, sz_e, idx, si_b, one, SCALE,
                N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, TS: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr,
                HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, ACCUM: tl.constexpr, FINAL: tl.constexpr,
                HAS_IDX: tl.constexpr, MASKED: tl.constexpr, SAVE: tl.constexpr, FAST: tl.constexpr):
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
    mld = _tile_mask(mt, me)
    u_t = _tile_load(_tile_ptr(u + pid_b * su_b, e, su_e, pu), mld)
    d_t = _tile_load(_tile_ptr(dt + pid_b * sd_b, e, sd_e, ph), mld)
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
        a_n, a2, b_n, c_n = _state_rows(n, A, e, me, Bm, sb_b, sb_n, C, sc_b, sc_n, pid_b, p0, k, mt, N, A_IS_LOG,
                                        MASKED)
        dec = _decay(dts * a2[None, :], FAST)
        h0 = tl.load(hrow + e * N + n, mask=me, other=0.0)
        # the carried state enters as the first step's input, so the scan's products of decays are unused
        # (dropped by the compiler): h_t = a_t·h_{t-1} + x_t is one FFMA per step
        _, h = tl.associative_scan((dec, _seed_first(dtu * b_n[:, None], dec, h0)), 0, _combine)
        if SAVE:  # the state before each of the backward's chunks of TS steps (hchk: NCHUNK of them per channel)
            tl.store(hsave + (e * NCHUNK + c * (T // TS)) * N + n, h0, mask=me)
            for j in tl.static_range(1, T // TS):
                sub = c * (T // TS) + j
                tl.store(hsave + (e * NCHUNK + sub) * N + n,
                         _pick_row(h, j * TS - 1), mask=me & (sub < NCHUNK))
        acc += h * c_n[:, None]
        tl.store(hrow + e * N + n, _pick_row(h, T - 1), mask=me)
    yp = _tile_ptr(y + pid_b * sy_b, e, sy_e, pu)
    if ACCUM:
        acc += _tile_load(yp, mld)
    if FINAL:
        acc = acc * SCALE
        if HAS_Z:
            z_t = _tile_load(_tile_ptr(z + pid_b * sz_b, e, sz_e, pu), mld)
            acc = acc * z_t / (1.0 + tl.exp(-z_t))
    _tile_store(yp, acc, mld)


@triton.jit
def _lane_direction(pid_b, e, me, L, u, su_b, su_e, dt, sd_b, sd_e, A, bias, Bm, sb_b, sb_n, C, sc_b, sc_n, D,
                    gap, sg_b, y, sy_b, sy_e, z, sz_b, sz_e, idx, si_b, hrow, hsave, NCHUNK, SCALE,
                    N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, TS: tl.constexpr, REV: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, ACCUM: tl.constexpr,
                    FINAL: tl.constexpr, HAS_IDX: tl.constexpr, SAVE: tl.constexpr, FAST: tl.constexpr):
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
                        N, BN, BE, T, TS, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D, HAS_GAP, HAS_Z, ACCUM, FINAL, HAS_IDX,
                        False, SAVE, FAST)
    if nfull * T < L:
        if REV:
            p0 = L - 1 - nfull * T
        else:
            p0 = nfull * T
        _lane_chunk(nfull, p0, k, L, hrow, hsave, NCHUNK, pid_b, e, me, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm, sb_b,
                        sb_n, C, sc_b, sc_n, d_skip, gap, sg_b, y, sy_b, sy_e, z, sz_b, sz_e, idx, si_b, one, SCALE,
                        N, BN, BE, T, TS, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D, HAS_GAP, HAS_Z, ACCUM, FINAL, HAS_IDX,
                        True, SAVE, FAST)


@triton.jit
def scan_fwd(u, su_d, su_b, su_e, dt, sd_d, sd_b, sd_e, A0, A1, bias0, bias1, Bm, sb_d, sb_b, sb_n,
                   C, sc_d, sc_b, sc_n, D0, D1, gap, sg_d, sg_b, z, sz_b, sz_e, y, sy_b, sy_e, hchk, hscr, idx, si_d,
                   si_b, E, L, NCHUNK, scale,
                   N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, TS: tl.constexpr,
                   NDIR: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr,
                   HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, SAVE: tl.constexpr, HAS_IDX: tl.constexpr,
                   FAST: tl.constexpr):
    # scan_fwd's arguments and semantics, plus hscr: a (b, E, N) fp32 scratch for the carried states. With SAVE,
    # the state before every TS steps (the backward's chunk; T a multiple of it) goes to hchk (NDIR, b, E, NCHUNK, N),
    # NCHUNK = cdiv(L, TS), where the backward reads it
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
                        N, BN, BE, T, TS, (d == 1) and not HAS_IDX, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D, HAS_GAP,
                        HAS_Z, d > 0, d == NDIR - 1, HAS_IDX, SAVE, FAST)


# ---- backward: one channel per thread as well -------------------------------------------------------------------
# (T, BE) tiles, each lane holding its channels' T steps in registers: the chunk's states are recomputed from the
# saved one and the reverse recurrence dh_t = C_t·g_t + a_{t+1}·dh_{t+1} runs sequentially in registers, so only
# the gradients of B and C (sums over channels) cross lanes. Compiled for sm_90 this is ~30 instructions per
# (token, channel, state) against ~161 for the (channels, steps) tiles it replaces (benchmarks/triton_sm90.py).

@triton.jit
def _xor_lanes(x, lane, OFF: tl.constexpr):
    # x (M, BE) with one channel per lane: each lane's values from lane ^ OFF (a warp-local gather, lowered to
    # lane shuffles; OFF < 32 stays inside the 32-channel group)
    return tl.gather(x, tl.broadcast_to((lane ^ OFF)[None, :], x.shape), 1)


@triton.jit
def _halve_rows(R, lane, M: tl.constexpr, BE: tl.constexpr, OFF: tl.constexpr):
    # (M, BE) -> (M/2, BE): a lane keeps one half of its rows (the upper where its bit OFF is set) and adds the
    # partner lane's (lane ^ OFF) values of that half, sending it the other half
    R3 = tl.reshape(R, (2, M // 2, BE))
    half = tl.arange(0, 2)[:, None, None]
    lo = tl.sum(tl.where(half == 0, R3, _neg_zero(R3.shape)), axis=0)  # free (see _neg_zero)
    hi = tl.sum(tl.where(half == 1, R3, _neg_zero(R3.shape)), axis=0)
    up = ((lane & OFF) != 0)[None, :]
    return tl.where(up, hi, lo) + _xor_lanes(tl.where(up, lo, hi), lane, OFF)


@triton.jit
def _lane_row_sums(P, lane, T: tl.constexpr, BE: tl.constexpr):
    # P (T, BE), one channel per lane, T <= 32 rows -> (BE,): lane l holds the sum over its group of 32 lanes
    # of row (l % 32) // (32 // T). A transposed reduction: tl.sum(P, axis=1) shuffles every row through all 5
    # butterfly levels (5·T shuffles and adds per lane); halving the rows at each level takes ~T + 5 (and two
    # selects per exchanged value): sm_90 backward 49 -> 36 instructions per (token, channel, state)
    R = P
    for i in tl.static_range(5):
        if (T >> i) >= 2:
            R = _halve_rows(R, lane, T >> i, BE, 16 >> i)
        else:
            R = R + _xor_lanes(R, lane, 16 >> i)
    return tl.reshape(R, (BE,))


@triton.jit
def _shift_up(x, last, T: tl.constexpr):
    # (T, BE) steps in each thread's registers -> rows 1..T-1 of x, then `last` (1, BE): only renames registers
    # (see _pick_row), where tl.gather along the steps is lowered through shared memory and lane shuffles
    col = tl.arange(0, T)[:, None]
    y = tl.broadcast_to(last, x.shape)
    for j in tl.static_range(T - 1):
        y = tl.where(col == j, _pick_row(x, j + 1)[None, :], y)
    return y


@triton.jit
def _lane_bwd_chunk(c, p0, k, kn, L, pid_b, e, me, one, SCALE, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm,
                    sb_b, sb_n, C, sc_b, sc_n, d_skip, gap, sg_b, gout, sgo_b, sgo_e, z, sz_b, sz_e, idx, si_b,
                    hsave, NCHUNK, grow, darow, dBp, dCp, part, lane, tok, wmask, du, ddt, dz, E, dD, dbias,
                    N: tl.constexpr, T: tl.constexpr, BE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr, HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr,
                    ACCUM_DZ: tl.constexpr, HAS_IDX: tl.constexpr, MASKED: tl.constexpr,
                    FAST: tl.constexpr):
    # steps p0 + k of chunk c (walking order c·T + col; kn = ±1 the walking direction). Only the sequence's last
    # chunk (MASKED, walked first) has padding steps or a last step without successor (a_{t+1} = 0 there).
    # grow / darow: this batch row's (E, N) fp32 scratch of the carried dh and the dA sums, one channel's per
    # thread; returns the running dD and dbias sums. dB and dC: lane l stores step tok of its 32-channel group's
    # sum (see _lane_row_sums) at row `part` of the partials where wmask
    col = tl.arange(0, T)
    p = p0 + k
    w = c * T + col
    pt = p0 + kn * tok
    if MASKED:
        mt = w < L
        m2n = ((w + 1) < L)[:, None] & me[None, :]  # steps with a successor
        mst = wmask & ((c * T + tok) < L)
    else:
        mt = col < T
        mst = wmask
    ph = p * one  # opaque positions: the lanes go along the channels, the steps stay in registers
    m2 = mt[:, None] & me[None, :]
    if HAS_IDX:
        pu = tl.load(idx + (pid_b * si_b + p0) + k, mask=mt, other=0) * one
    else:
        pu = ph
    # the tiles needed after the loop over states (u, Δ, z, gout) are loaded again there rather than held
    # across it: registers, not loads, limit the tile
    mld = _tile_mask(mt, me)
    u_ptr = _tile_ptr(u + pid_b * su_b, e, su_e, pu)
    dt_ptr = _tile_ptr(dt + pid_b * sd_b, e, sd_e, ph)
    go_ptr = _tile_ptr(gout + pid_b * sgo_b, e, sgo_e, pu)
    z_ptr = _tile_ptr(z + pid_b * sz_b, e, sz_e, pu)
    u_t = _tile_load(u_ptr, mld)
    d_t = _delta(dt_ptr, mld, d_bias, HAS_BIAS, SOFTPLUS, True)
    if MASKED:
        d_t = tl.where(m2, d_t, 0.0)
    # (1, BE) Δ of the step after the chunk: a_{t+1} of the chunk's last step (the others are its decays shifted)
    d_l = _delta(dt + pid_b * sd_b + e * sd_e + (p0 + kn * T), me & ((c + 1) * T < L), d_bias, HAS_BIAS,
                 SOFTPLUS, False)
    dtu = d_t * u_t
    if HAS_GAP:
        s_t = tl.load(gap + (pid_b * sg_b + p0) + k, mask=mt, other=1.0).to(tl.float32)
        s_l = tl.load(gap + (pid_b * sg_b + p0) + kn * T, mask=(c + 1) * T < L, other=1.0).to(tl.float32)
        dts = d_t * s_t[:, None]
        d_l = d_l * s_l
    else:
        dts = d_t
    gy = _tile_load(go_ptr, mld) * SCALE
    if HAS_Z:
        z_t = _tile_load(z_ptr, mld)
        gy = gy * z_t / (1.0 + tl.exp(-z_t))
    y_acc = tl.zeros(dtu.shape, dtype=tl.float32)  # the scan's output, for dz
    if HAS_D:
        y_acc += d_skip[None, :] * u_t
        dD += tl.sum(gy * u_t, axis=0)
    g_b = tl.zeros(dtu.shape, dtype=tl.float32)  # Σ_n dh_n·B_n
    g_a = tl.zeros(dtu.shape, dtype=tl.float32)  # Σ_n dh_n·A_n·a_n·h_{n,t-1}
    for n in range(N):
        a_n, a2, b_n, c_n = _state_rows(n, A, e, me, Bm, sb_b, sb_n, C, sc_b, sc_n, pid_b, p0, k, mt, N, A_IS_LOG,
                                        MASKED)
        drive = dtu * b_n[:, None]
        dec = _decay(dts * a2[None, :], FAST)
        # reverse recurrence, started from the dh carried in from the next chunk. a_{t+1}: the decays shifted by
        # one step within the registers, the last from the step after the chunk
        a_next = _shift_up(dec, _decay(d_l * a2[None, :], FAST), T)
        if MASKED:
            a_next = tl.where(m2n, a_next, 0.0)
        # a forward scan of the flipped chunk: the steps are in registers, so the flips only rename them, while
        # reverse=True is lowered with lane shuffles (~240 per state, seen in the sm_90 SASS)
        # (the carried dh seeded into the first step walked, as in the forward)
        g_in = tl.load(grow + e * N + n, mask=me, other=0.0)
        a_rev = tl.flip(a_next, 0)
        _, dh = tl.associative_scan((a_rev, _seed_first(tl.flip(gy * c_n[:, None], 0), a_rev, g_in)), 0, _combine)
        dh = tl.flip(dh, 0)
        # the chunk's states, from the one the forward saved at its start
        h0 = tl.load(hsave + (e * NCHUNK + c) * N + n, mask=me, other=0.0)
        _, h = tl.associative_scan((dec, _seed_first(drive, dec, h0)), 0, _combine)
        if HAS_Z:
            y_acc += h * c_n[:, None]
        tl.store(grow + e * N + n, _pick_row(dh, 0), mask=me)
        if MASKED:
            dh = tl.where(m2, dh, 0.0)
        hx = dh * (h - drive)  # dh_t · a_t·h_{t-1}
        g_b += dh * b_n[:, None]
        g_a += hx * a_n[None, :]
        dA_n = tl.sum(hx * dts, axis=0)
        if A_IS_LOG:
            dA_n = dA_n * a_n
        tl.store(darow + e * N + n, tl.load(darow + e * N + n, mask=me, other=0.0) + dA_n, mask=me)
        # B and C are shared by the channels: this program's partial sums
        tl.store(dBp + part + n * L + pt, _lane_row_sums(dh * dtu, lane, T, BE), mask=mst)
        tl.store(dCp + part + n * L + pt, _lane_row_sums(gy * h, lane, T, BE), mask=mst)
    u_t = _tile_load(u_ptr, mld)
    r_t = _tile_load(dt_ptr, mld)
    if HAS_BIAS:
        r_t += d_bias[None, :]
    if SOFTPLUS:
        g_du = g_b * _softplus(r_t)
    else:
        g_du = g_b * r_t
    if HAS_D:
        g_du += gy * d_skip[None, :]
    if HAS_GAP:
        g_a = g_a * s_t[:, None]
    g_ddt = g_b * u_t + g_a
    if SOFTPLUS:
        g_ddt = g_ddt / (1.0 + tl.exp(-r_t))
    if MASKED:
        g_ddt = tl.where(m2, g_ddt, 0.0)
    if HAS_BIAS:
        dbias += tl.sum(g_ddt, axis=0)
    row = pid_b * E * L
    _tile_store(_tile_ptr(du + row, e, L, pu), g_du, mld)
    _tile_store(_tile_ptr(ddt + row, e, L, ph), g_ddt, mld)
    if HAS_Z:
        go = _tile_load(go_ptr, mld)
        z_t = _tile_load(z_ptr, mld)
        sig_z = 1.0 / (1.0 + tl.exp(-z_t))
        gz = go * SCALE * y_acc * sig_z * (1.0 + z_t * (1.0 - sig_z))
        dz_ptr = _tile_ptr(dz + row, e, L, pu)
        if ACCUM_DZ:
            gz += _tile_load(dz_ptr, mld)
        _tile_store(dz_ptr, gz, mld)
    return dD, dbias


@triton.jit
def _lane_bwd_direction(pid_b, e, me, L, NCHUNK, NPART, u, su_b, su_e, dt, sd_b, sd_e, A, bias, Bm, sb_b,
                        sb_n, C, sc_b, sc_n, D, gap, sg_b, hsave, gout, sgo_b, sgo_e, z, sz_b, sz_e, idx, si_b,
                        du, ddt, dz, dBp, dCp, darow, dDp, dbiasp, grow, E, SCALE,
                        N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, REV: tl.constexpr,
                        SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
                        HAS_D: tl.constexpr, HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, ACCUM_DZ: tl.constexpr,
                        HAS_IDX: tl.constexpr, FAST: tl.constexpr):
    # du/ddt/dz: (b, E, L) contiguous; dBp/dCp: (b, NPART, N, L); darow/grow: this row's (E, N); dDp/dbiasp: (b, E)
    n_idx = tl.arange(0, BN)
    zero_mask = me[None, :] & (n_idx[:, None] < N)
    tl.store(grow + e[None, :] * N + n_idx[:, None], tl.zeros((BN, BE), dtype=tl.float32), mask=zero_mask)
    tl.store(darow + e[None, :] * N + n_idx[:, None], tl.zeros((BN, BE), dtype=tl.float32), mask=zero_mask)
    tl.debug_barrier()  # the zeros come from other threads than each channel's (see _lane_direction)
    d_bias = tl.zeros((BE,), dtype=tl.float32)
    d_skip = tl.zeros((BE,), dtype=tl.float32)
    if HAS_BIAS:
        d_bias = tl.load(bias + e, mask=me, other=0.0).to(tl.float32)
    if HAS_D:
        d_skip = tl.load(D + e, mask=me, other=0.0).to(tl.float32)
    dD = tl.zeros((BE,), dtype=tl.float32)
    dbias = tl.zeros((BE,), dtype=tl.float32)
    one = L // L
    if REV:
        k = -tl.arange(0, T)
        kn = -1
    else:
        k = tl.arange(0, T)
        kn = 1
    # dB / dC partials per 32-channel group (NPART = cdiv(E, 32) of them), T steps spread over its lanes
    lane = tl.arange(0, BE)
    tok = (lane % 32) // (32 // T)
    wmask = ((lane % (32 // T)) == 0) & (e // 32 < NPART)
    part = ((pid_b * NPART + e // 32) * N) * L
    for i in range(NCHUNK):
        c = NCHUNK - 1 - i
        if REV:
            p0 = L - 1 - c * T
        else:
            p0 = c * T
        if i == 0:  # the sequence's last chunk: padding, and no successor for its last step
            dD, dbias = _lane_bwd_chunk(
                c, p0, k, kn, L, pid_b, e, me, one, SCALE, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm, sb_b, sb_n,
                C, sc_b, sc_n, d_skip, gap, sg_b, gout, sgo_b, sgo_e, z, sz_b, sz_e, idx, si_b, hsave, NCHUNK, grow,
                darow, dBp, dCp, part, lane, tok, wmask, du, ddt, dz, E, dD, dbias, N, T, BE, SOFTPLUS, HAS_BIAS,
                A_IS_LOG, HAS_D, HAS_GAP, HAS_Z, ACCUM_DZ, HAS_IDX, True, FAST)
        else:
            dD, dbias = _lane_bwd_chunk(
                c, p0, k, kn, L, pid_b, e, me, one, SCALE, u, su_b, su_e, dt, sd_b, sd_e, A, d_bias, Bm, sb_b, sb_n,
                C, sc_b, sc_n, d_skip, gap, sg_b, gout, sgo_b, sgo_e, z, sz_b, sz_e, idx, si_b, hsave, NCHUNK, grow,
                darow, dBp, dCp, part, lane, tok, wmask, du, ddt, dz, E, dD, dbias, N, T, BE, SOFTPLUS, HAS_BIAS,
                A_IS_LOG, HAS_D, HAS_GAP, HAS_Z, ACCUM_DZ, HAS_IDX, False, FAST)
    if HAS_D:
        tl.store(dDp + pid_b * E + e, dD, mask=me)
    if HAS_BIAS:
        tl.store(dbiasp + pid_b * E + e, dbias, mask=me)

@triton.jit
def scan_bwd(u, su_d, su_b, su_e, dt, sd_d, sd_b, sd_e, A0, A1, bias0, bias1, Bm, sb_d, sb_b, sb_n,
             C, sc_d, sc_b, sc_n, D0, D1, gap, sg_d, sg_b, z, sz_b, sz_e, gout, sgo_b, sgo_e, hchk, idx, si_d, si_b,
             du, ddt, dz, dBp, dCp, dAp, dDp, dbiasp, gscr, E, L, NCHUNK, NPART, scale,
             N: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, T: tl.constexpr, NDIR: tl.constexpr,
             SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr,
             HAS_GAP: tl.constexpr, HAS_Z: tl.constexpr, HAS_IDX: tl.constexpr, FAST: tl.constexpr):
    # gscr: a (b, E, N) fp32 scratch for the carried dh; dAp (NDIR, b, E, N) is summed in place
    pid_b, pid_e = tl.program_id(0), tl.program_id(1)
    nb = tl.num_programs(0)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    sz_grad = nb * E * L
    for d in tl.static_range(NDIR):
        if d > 0:
            tl.debug_barrier()  # this direction adds to dz what the previous one stored, in another step order
        A_d, bias_d, D_d = _direction_params(d, A0, A1, bias0, bias1, D0, D1)
        _lane_bwd_direction(pid_b, e, me, L, NCHUNK, NPART, u + d * su_d, su_b, su_e, dt + d * sd_d, sd_b,
                            sd_e, A_d, bias_d, Bm + d * sb_d, sb_b, sb_n, C + d * sc_d, sc_b, sc_n, D_d,
                            gap + d * sg_d, sg_b, hchk + (d * nb + pid_b) * E * NCHUNK * N, gout, sgo_b, sgo_e, z,
                            sz_b, sz_e, idx + d * si_d, si_b, du + d * sz_grad, ddt + d * sz_grad, dz,
                            dBp + d * nb * NPART * N * L, dCp + d * nb * NPART * N * L, dAp + (d * nb + pid_b) * E * N,
                            dDp + d * nb * E, dbiasp + d * nb * E, gscr + pid_b * E * N, E, scale,
                            N, BN, BE, T, (d == 1) and not HAS_IDX, SOFTPLUS, HAS_BIAS, A_IS_LOG, HAS_D, HAS_GAP,
                            HAS_Z, d > 0, HAS_IDX, FAST)
