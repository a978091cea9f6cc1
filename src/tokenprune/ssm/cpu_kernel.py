"""Fast CPU selective scan: numba kernels.

Forward (inference and training): channels are the vector lanes. Each parallel item (a batch row and a block
of channels) copies a tile of time steps of u, delta and z into token-major local buffers, so that the update
of all its channels' states h[n, :] at a step is a contiguous vector loop with no horizontal sums; the bias
+ softplus of delta and the SiLU(z) gate are computed in the same pass with the vectorisable math of
`vecmath` (torch's softplus and sigmoid were a fifth of a ViM-T forward on CPU). The tiles keep the
channel-major (b, E, L) layout of the callers: transposing whole tensors in torch was slower. Blocks of
channels let a batch of one use every thread too.

Backward: the same channel lanes. Each item runs its block's forward again keeping every state and decay
(blocks of at most 64 channels keep that to a few MB), then the reverse recurrence; gradients of what the
channels share (A per batch row, B, C, D, the bias) go to per-item partial slices that are summed afterwards,
so there are no write races.

float32 is the fast path; float64 works too (scalar numpy math) so gradcheck can verify the backward.
"""
import numpy as np
import numba
import torch
from numba import njit, prange

from .vecmath import vexp as _exp
from .vecmath import SILU_FLOOR, vsilu, vsoftplus

# Typed constants: float32 op float32 stays float32, float32 op float64 -> float64,
# so these work for both kernels' dtypes without upcasting the fp32 path.
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_LANES = 16  # channel blocks are multiples of this (two AVX-512 / four AVX2 vectors)
_TILE = 64  # time steps the forward moves token-major at a time (a few 100 KB: stays in L2)
# the backward keeps every state and decay of its block: at most 64 channels and 4.5 MB of them (measured: 64
# channels best at L=197, 1.6 MB; at L=1024 32 channels, 4.2 MB, beat 64 channels, 8.4 MB, by 2.6x). The
# block never goes below _LANES channels, so very long sequences keep more.
_BACKWARD_CHANNELS = 64
_BACKWARD_BYTES = 4_500_000


def _jit(**kw):
    """njit with an on-disk cache when a cache location is writable."""
    def deco(fn):
        try:
            return njit(cache=True, **kw)(fn)
        except RuntimeError:  # numba: "no locator available" (read-only install)
            return njit(cache=False, **kw)(fn)
    return deco


# reassoc lets LLVM vectorise the backward's sums over the channel lanes; contract allows FMAs. Neither assumes
# finite values, and the result stays within ~1e-6 of the reference.
_FASTMATH = {"reassoc", "contract"}


@_jit(parallel=True, fastmath=_FASTMATH)
def scan_fwd_kernel(u, delta, bias, At, B, C, D, z, softplus, block, tile, out):
    """out = (C.h + D u) * silu(z) with dt = softplus(delta + bias). u, delta, z, out: (b, E, L); At: (N, E);
    B, C: (b, N, L). Empty bias / D / z: that term is absent."""
    nb, ne, L = u.shape
    nn = At.shape[0]
    has_bias, has_D, has_z = bias.shape[0] > 0, D.shape[0] > 0, z.shape[0] > 0
    nblocks = (ne + block - 1) // block
    for item in prange(nb * nblocks):
        b = item // nblocks
        e0 = (item % nblocks) * block
        w = min(block, ne - e0)
        h = np.zeros((nn, w), u.dtype)
        tu = np.empty((tile, w), u.dtype)  # one time tile of the inputs, token-major
        tdt = np.empty((tile, w), u.dtype)
        tz = np.empty((tile, w), u.dtype)
        ty = np.empty((tile, w), u.dtype)
        tb = np.empty((tile, nn), u.dtype)
        tc = np.empty((tile, nn), u.dtype)
        dtu = np.empty(w, u.dtype)
        # indices are cast to unsigned where they are not a bare loop counter: a signed index gets numba's
        # negative-index wraparound, a select per element that keeps LLVM from vectorising the loop
        for t0 in range(0, L, tile):
            tt = min(tile, L - t0)
            for j in range(w):  # gather the tile: channel-major rows in, token-major tile out
                e = np.uint64(e0 + j)
                bias_e = bias[e] if has_bias else _ZERO
                for s in range(tt):
                    tu[s, j] = u[b, e, np.uint64(t0 + s)]
                    tdt[s, j] = delta[b, e, np.uint64(t0 + s)] + bias_e
                if has_z:
                    for s in range(tt):
                        tz[s, j] = z[b, e, np.uint64(t0 + s)]
            for n in range(nn):
                for s in range(tt):
                    tb[s, n] = B[b, n, np.uint64(t0 + s)]
                    tc[s, n] = C[b, n, np.uint64(t0 + s)]
            for s in range(tt):
                if softplus:
                    for j in range(w):
                        tdt[s, j] = vsoftplus(tdt[s, j])
                for j in range(w):
                    dtu[j] = tdt[s, j] * tu[s, j]
                    ty[s, j] = D[np.uint64(e0 + j)] * tu[s, j] if has_D else _ZERO
                for n in range(nn):  # all channels' states at once: the vector loop is over j
                    bn = tb[s, n]
                    cn = tc[s, n]
                    for j in range(w):
                        hv = _exp(tdt[s, j] * At[n, np.uint64(e0 + j)]) * h[n, j] + dtu[j] * bn
                        h[n, j] = hv
                        ty[s, j] += cn * hv
                if has_z:
                    for j in range(w):
                        ty[s, j] *= vsilu(tz[s, j])
            for j in range(w):  # scatter the tile back, channel-major
                e = np.uint64(e0 + j)
                for s in range(tt):
                    out[b, e, np.uint64(t0 + s)] = ty[s, j]


@_jit(parallel=True, fastmath=_FASTMATH)
def scan_bwd_kernel(u, delta, bias, At, B, C, D, z, gout, softplus, block,
                    du, ddelta, dz, dA_p, dB_p, dC_p, dD_p, dbias_p):
    """Gradients, inputs as scan_fwd_kernel's plus gout (b, E, L). Per (batch row, block of channels): the
    forward again, keeping every state and decay of the block (a few MB at most: blocks are small), then the
    reverse recurrence, channels as the vector lanes. Partial sums of shared gradients go to slices no other
    item writes: dA_p (b, N, E), dD_p / dbias_p (b, E), dB_p / dC_p (blocks, b, N, L); the caller sums them."""
    nb, ne, L = u.shape
    nn = At.shape[0]
    has_bias, has_D, has_z = bias.shape[0] > 0, D.shape[0] > 0, z.shape[0] > 0
    nblocks = (ne + block - 1) // block
    for item in prange(nb * nblocks):
        b = item // nblocks
        blk = item % nblocks
        e0 = blk * block
        w = min(block, ne - e0)
        hs = np.empty((L + 1, nn, w), u.dtype)  # hs[t + 1] = h_t, hs[0] = h_{-1} = 0
        As = np.empty((L, nn, w), u.dtype)      # decays a_t = exp(dt_t A)
        tu = np.empty((L, w), u.dtype)          # the inputs of the block, token-major
        tdt = np.empty((L, w), u.dtype)
        tsp = np.empty((L, w), u.dtype)         # softplus'(pre) = sigmoid(pre)
        tz = np.empty((L, w), u.dtype)
        tg = np.empty((L, w), u.dtype)
        ty = np.empty((L, w), u.dtype)          # y before the gate
        tdu = np.empty((L, w), u.dtype)
        tdd = np.empty((L, w), u.dtype)
        tdz = np.empty((L, w), u.dtype)
        tb = np.empty((L, nn), u.dtype)
        tc = np.empty((L, nn), u.dtype)
        carry = np.zeros((nn, w), u.dtype)      # a_{t+1} dL/dh_{t+1}
        dA = np.zeros((nn, w), u.dtype)
        dD_acc = np.zeros(w, np.float64)        # long sums over L: accumulate in float64
        dbias_acc = np.zeros(w, np.float64)
        dy = np.empty(w, u.dtype)
        dh = np.empty(w, u.dtype)
        ddt = np.empty(w, u.dtype)
        du_t = np.empty(w, u.dtype)
        dtu = np.empty(w, u.dtype)
        for j in range(w):  # gather: channel-major rows in, token-major out
            e = np.uint64(e0 + j)
            bias_e = bias[e] if has_bias else _ZERO
            for t in range(L):
                tu[t, j] = u[b, e, t]
                tdt[t, j] = delta[b, e, t] + bias_e
                tg[t, j] = gout[b, e, t]
            if has_z:
                for t in range(L):
                    tz[t, j] = z[b, e, t]
        for n in range(nn):
            for t in range(L):
                tb[t, n] = B[b, n, t]
                tc[t, n] = C[b, n, t]
        if softplus:
            for t in range(L):
                for j in range(w):
                    pre = tdt[t, j]
                    tsp[t, j] = _ONE / (_ONE + _exp(-pre))
                    tdt[t, j] = vsoftplus(pre)
        hs[0, :, :] = 0
        for t in range(L):  # the forward again, keeping states and decays
            for j in range(w):
                dtu[j] = tdt[t, j] * tu[t, j]
                ty[t, j] = D[np.uint64(e0 + j)] * tu[t, j] if has_D else _ZERO
            for n in range(nn):
                bn = tb[t, n]
                cn = tc[t, n]
                for j in range(w):
                    a = _exp(tdt[t, j] * At[n, np.uint64(e0 + j)])
                    As[t, n, j] = a
                    hs[t + 1, n, j] = a * hs[t, n, j] + dtu[j] * bn
                for j in range(w):
                    ty[t, j] += cn * hs[t + 1, n, j]
        # reverse recurrence. LLVM does not vectorise loops that write several arrays it cannot prove apart,
        # so each loop over j writes one or two arrays
        for tt in range(L):
            t = L - 1 - tt
            if has_z:  # d(y silu z)/dz = y sig (1 + z (1 - sig))
                for j in range(w):
                    zt = max(tz[t, j], SILU_FLOOR)  # as vsilu: the gate and its slope are 0 below it
                    sg = _ONE / (_ONE + _exp(-zt))
                    dy[j] = tg[t, j] * zt * sg
                    tdz[t, j] = tg[t, j] * ty[t, j] * sg * (_ONE + zt * (_ONE - sg))
            else:
                for j in range(w):
                    dy[j] = tg[t, j]
            for j in range(w):
                ddt[j] = _ZERO
                du_t[j] = dy[j] * D[np.uint64(e0 + j)] if has_D else _ZERO
            for n in range(nn):
                bn = tb[t, n]
                cn = tc[t, n]
                for j in range(w):  # dL/dh_t
                    g = dy[j] * cn + carry[n, j]
                    dh[j] = g
                    carry[n, j] = g * As[t, n, j]
                for j in range(w):  # through exp(dt A) and dt B u
                    ddt[j] += dh[j] * (hs[t, n, j] * As[t, n, j] * At[n, np.uint64(e0 + j)] + tu[t, j] * bn)
                for j in range(w):
                    du_t[j] += dh[j] * tdt[t, j] * bn
                for j in range(w):
                    dA[n, j] += dh[j] * hs[t, n, j] * As[t, n, j] * tdt[t, j]
                sum_b = _ZERO
                sum_c = _ZERO
                for j in range(w):  # B and C are shared by the channels: sums over the lanes
                    sum_b += dh[j] * tdt[t, j] * tu[t, j]
                    sum_c += dy[j] * hs[t + 1, n, j]
                dB_p[blk, b, n, t] = sum_b
                dC_p[blk, b, n, t] = sum_c
            for j in range(w):
                tdd[t, j] = ddt[j] * tsp[t, j] if softplus else ddt[j]
                tdu[t, j] = du_t[j]
            for j in range(w):
                dbias_acc[j] += tdd[t, j]
                dD_acc[j] += dy[j] * tu[t, j]
        for j in range(w):  # scatter, channel-major
            e = np.uint64(e0 + j)
            for t in range(L):
                du[b, e, t] = tdu[t, j]
                ddelta[b, e, t] = tdd[t, j]
            if has_z:
                for t in range(L):
                    dz[b, e, t] = tdz[t, j]
            dD_p[b, e] = dD_acc[j]
            dbias_p[b, e] = dbias_acc[j]
        for n in range(nn):
            for j in range(w):
                dA_p[b, n, np.uint64(e0 + j)] = dA[n, j]


# ---- torch <-> numpy wrappers -------------------------------------------

def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _np(x, cdt, empty_shape=None):
    """Contiguous numpy view in the compute dtype; None -> an empty array."""
    if x is None:
        return np.empty(empty_shape, dtype=np.float64 if cdt == torch.float64 else np.float32)
    return x.detach().to(device="cpu", dtype=cdt).contiguous().numpy()


def _nchunks(nitems):
    """Threads for this call: no more than torch uses (so a process that limits torch, e.g. one DDP rank
    per core, is not oversubscribed by numba), and no more than there are items."""
    nthreads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(nthreads)
    return max(1, min(nthreads, nitems))


def _channel_block(nb, ne, most=None):
    """Channels per parallel item: all of them (at most ``most``) when the batch rows alone give every thread
    work, else fewer, so that a batch of one uses every thread too; a multiple of _LANES."""
    blocks_per_row = -(-_nchunks(nb * ne) // nb)
    if most is not None:
        blocks_per_row = max(blocks_per_row, -(-ne // most))
    channels = -(-ne // blocks_per_row)
    return -(-channels // _LANES) * _LANES


def cpu_scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Output (b, E, L) in the compute dtype (float32, or float64 when u is float64)."""
    cdt = _compute_dtype(u)
    uu = _np(u, cdt)
    nb, ne, _ = uu.shape
    out = np.empty(uu.shape, dtype=uu.dtype)
    scan_fwd_kernel(uu, _np(delta, cdt), _np(delta_bias, cdt, (0,)), _np(A.t(), cdt), _np(B, cdt), _np(C, cdt),
                    _np(D, cdt, (0,)), _np(z, cdt, (0, 0, 0)), bool(delta_softplus), _channel_block(nb, ne),
                    _TILE, out)
    return torch.from_numpy(out)


def cpu_scan_backward(gout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the compute dtype; None for
    absent optionals."""
    cdt = _compute_dtype(u)
    uu = _np(u, cdt)
    nb, ne, L = uu.shape
    nn = A.shape[1]
    f = uu.dtype
    per_channel = 2 * (L + 1) * nn * uu.itemsize
    most = max(_LANES, min(_BACKWARD_CHANNELS, _BACKWARD_BYTES // per_channel // _LANES * _LANES))
    block = _channel_block(nb, ne, most)
    nblocks = -(-ne // block)
    du, ddelta = np.empty_like(uu), np.empty_like(uu)
    dz = np.empty_like(uu) if z is not None else np.empty((0, 0, 0), f)
    dA_p, dD_p, dbias_p = np.empty((nb, nn, ne), f), np.empty((nb, ne), f), np.empty((nb, ne), f)
    dB_p, dC_p = np.empty((nblocks, nb, nn, L), f), np.empty((nblocks, nb, nn, L), f)
    scan_bwd_kernel(uu, _np(delta, cdt), _np(delta_bias, cdt, (0,)), _np(A.t(), cdt), _np(B, cdt), _np(C, cdt),
                    _np(D, cdt, (0,)), _np(z, cdt, (0, 0, 0)), _np(gout, cdt), bool(delta_softplus), block,
                    du, ddelta, dz, dA_p, dB_p, dC_p, dD_p, dbias_p)
    t = torch.from_numpy

    def red(x):  # sum the partial slices (a copy-free view when there is one)
        return t(x[0]) if x.shape[0] == 1 else t(x).sum(0)

    return (t(du), t(ddelta), red(dA_p).t(), red(dB_p), red(dC_p),
            red(dD_p) if D is not None else None, t(dz) if z is not None else None,
            red(dbias_p) if delta_bias is not None else None)
