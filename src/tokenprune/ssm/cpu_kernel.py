"""Fast CPU selective scan: numba kernels.

Forward (inference and training): channels are the vector lanes. Each parallel item (a batch row and a block
of channels) copies a tile of time steps of u, delta and z into token-major local buffers, so that the update
of all its channels' states h[n, :] at a step is a contiguous vector loop with no horizontal sums; the bias
+ softplus of delta and the SiLU(z) gate are computed in the same pass with the vectorisable math of
`vecmath` (torch's softplus and sigmoid were a fifth of a ViM-T forward on CPU). The tiles keep the
channel-major (b, E, L) layout of the callers: transposing whole tensors in torch was slower. Blocks of
channels let a batch of one use every thread too.

Backward: one channel at a time, with the state dimension N as the vector loop. It recomputes the states of
one channel into a local (L+1) x N buffer and runs the reverse recurrence; dA/dB/dC/dD/dbias are shared
between channels (or batch rows), so each parallel chunk accumulates into its own slice and the slices are
summed afterwards (no races). B and C are read transposed, (b, L, N).

float32 is the fast path; float64 works too (scalar numpy math) so gradcheck can verify the backward.
"""
import numpy as np
import numba
import torch
import torch.nn.functional as F
from numba import njit, prange

from .vecmath import vexp as _exp
from .vecmath import vsilu, vsoftplus

# Typed constants: float32 op float32 stays float32, float32 op float64 -> float64,
# so these work for both kernels' dtypes without upcasting the fp32 path.
_ZERO = np.float32(0.0)
_ZERO64 = np.float64(0.0)
_ONE = np.float32(1.0)
_LANES = 16  # channel blocks of the forward are multiples of this (two AVX-512 / four AVX2 vectors)
_TILE = 64  # time steps the forward moves token-major at a time (a few 100 KB: stays in L2)


def _jit(**kw):
    """njit with an on-disk cache when a cache location is writable."""
    def deco(fn):
        try:
            return njit(cache=True, **kw)(fn)
        except RuntimeError:  # numba: "no locator available" (read-only install)
            return njit(cache=False, **kw)(fn)
    return deco


# reassoc lets LLVM vectorise the sums over N of the backward; contract allows FMAs. Neither assumes
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
def scan_bwd_kernel(u, dt, dsp, A, Bt, Ct, D, z, zsig, gout, nchunks,
                    du, ddelta, dz, dA_p, dBt_p, dCt_p, dD_p, dbias_p):
    """Gradients. dsp = d softplus / d pre (empty: no softplus). Outputs named
    *_p have a leading chunk axis, must be zeroed, and are summed by the caller.

    LLVM cannot prove that numba arrays do not alias, and gives up vectorising
    loops that write several arrays; so every hot loop writes one array, and
    the recurrence runs on small local vectors copied into the row buffers.
    """
    nb, ne, L = u.shape
    nn = A.shape[1]
    has_D, has_z, has_sp = D.shape[0] > 0, z.shape[0] > 0, dsp.shape[0] > 0
    nitems = nb * ne
    for c in prange(nchunks):
        hs = np.zeros((L + 1, nn), u.dtype)  # hs[t + 1] = h_t; hs[0] = h_{-1} = 0
        ga = np.zeros((L + 1, nn), u.dtype)  # a_t = exp(dt_t A), then a_t * dL/dh_t; row L = 0
        dys = np.empty(L, u.dtype)           # dL/dy_t (y before the gate)
        a = np.empty(nn, u.dtype)
        h = np.empty(nn, u.dtype)
        dA_loc = np.empty(nn, u.dtype)
        for i in range(c * nitems // nchunks, (c + 1) * nitems // nchunks):
            b, e = i // ne, i % ne
            h[:] = 0
            for t in range(L):  # recompute the forward states
                d = dt[b, e, t]
                for n in range(nn):
                    a[n] = _exp(d * A[e, n])
                dtu = d * u[b, e, t]
                y = _ZERO
                for n in range(nn):
                    h[n] = a[n] * h[n] + dtu * Bt[b, t, n]
                    y += Ct[b, t, n] * h[n]
                for n in range(nn):
                    ga[t, n] = a[n]
                    hs[t + 1, n] = h[n]
                dy = gout[b, e, t]
                if has_z:  # d(y z sig(z))/dz = y sig (1 + z (1 - sig))
                    if has_D:
                        y += D[e] * u[b, e, t]
                    zt, sg = z[b, e, t], zsig[b, e, t]
                    dz[b, e, t] = dy * y * sg * (_ONE + zt * (_ONE - sg))
                    dy = dy * zt * sg
                dys[t] = dy
            dD_acc = _ZERO64  # long scalar sums over L: accumulate in float64
            dbias_acc = _ZERO64
            for t in range(L - 1, -1, -1):  # reverse recurrence
                dy = dys[t]
                ut = u[b, e, t]
                s_ha = _ZERO  # d/d(dt) through exp(dt A)
                s_gb = _ZERO  # d/d(dt u) through dt B u
                for n in range(nn):
                    gh = dy * Ct[b, t, n] + ga[t + 1, n]  # dL/dh_t
                    g = gh * ga[t, n]
                    ga[t, n] = g
                    s_ha += g * hs[t, n] * A[e, n]
                    s_gb += gh * Bt[b, t, n]
                d = dt[b, e, t]
                if has_D:
                    dD_acc += dy * ut
                    du[b, e, t] = s_gb * d + dy * D[e]
                else:
                    du[b, e, t] = s_gb * d
                ddt = s_ha + s_gb * ut
                if has_sp:
                    ddt *= dsp[b, e, t]
                ddelta[b, e, t] = ddt
                dbias_acc += ddt
            # grads of shared A, B, C from the saved rows
            dA_loc[:] = 0
            for t in range(L):
                d = dt[b, e, t]
                dtu = d * u[b, e, t]
                dy = dys[t]
                for n in range(nn):
                    dA_loc[n] += d * ga[t, n] * hs[t, n]
                for n in range(nn):
                    dCt_p[c, b, t, n] += dy * hs[t + 1, n]
                for n in range(nn):
                    dBt_p[c, b, t, n] += (dy * Ct[b, t, n] + ga[t + 1, n]) * dtu
            for n in range(nn):
                dA_p[c, e, n] += dA_loc[n]
            dD_p[c, e] += dD_acc
            dbias_p[c, e] += dbias_acc


# ---- torch <-> numpy wrappers -------------------------------------------

def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _np(x, cdt, empty_shape=None):
    """Contiguous numpy view in the compute dtype; None -> an empty array."""
    if x is None:
        return np.empty(empty_shape, dtype=np.float64 if cdt == torch.float64 else np.float32)
    return x.detach().to(device="cpu", dtype=cdt).contiguous().numpy()


def _nchunks(nitems):
    """Threads for this call: no more than torch uses (so a process that limits
    torch, e.g. one DDP rank per core, is not oversubscribed by numba); one
    chunk per thread keeps the chunk-private gradient slices few."""
    nthreads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(nthreads)
    return max(1, min(nthreads, nitems))


def _common(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt):
    """Backward kernel inputs (channel-major); the elementwise softplus/sigmoid run in torch."""
    pre = delta.detach().to(cdt)
    if delta_bias is not None:
        pre = pre + delta_bias.detach().to(cdt)[:, None]
    dt = F.softplus(pre) if delta_softplus else pre
    zsig = torch.sigmoid(z.detach().to(cdt)) if z is not None else None
    arrs = (_np(u, cdt), _np(dt, cdt), _np(A, cdt), _np(B.transpose(1, 2), cdt),
            _np(C.transpose(1, 2), cdt), _np(D, cdt, (0,)), _np(z, cdt, (0, 0, 0)),
            _np(zsig, cdt, (0, 0, 0)))
    return pre, arrs


def _forward_block(nb, ne):
    """Channels per parallel item of the forward: all of them when the batch rows alone give every thread
    work, else fewer (a multiple of _LANES), so that a batch of one uses every thread too."""
    blocks_per_row = -(-_nchunks(nb * ne) // nb)
    channels = -(-ne // blocks_per_row)
    return -(-channels // _LANES) * _LANES


def cpu_scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Output (b, E, L) in the compute dtype (float32, or float64 when u is float64)."""
    cdt = _compute_dtype(u)
    uu = _np(u, cdt)
    nb, ne, _ = uu.shape
    out = np.empty(uu.shape, dtype=uu.dtype)
    scan_fwd_kernel(uu, _np(delta, cdt), _np(delta_bias, cdt, (0,)), _np(A.t(), cdt), _np(B, cdt), _np(C, cdt),
                    _np(D, cdt, (0,)), _np(z, cdt, (0, 0, 0)), bool(delta_softplus), _forward_block(nb, ne),
                    _TILE, out)
    return torch.from_numpy(out)


def cpu_scan_backward(gout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the compute dtype; None for
    absent optionals."""
    cdt = _compute_dtype(u)
    pre, (uu, dt, AA, Bt, Ct, DD, zz, zsig) = _common(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt)
    dsp = _np(torch.sigmoid(pre) if delta_softplus else None, cdt, (0, 0, 0))
    nb, ne, L = uu.shape
    nn = AA.shape[1]
    nc = _nchunks(nb * ne)
    f = uu.dtype
    du, ddelta = np.empty_like(uu), np.empty_like(uu)
    dz = np.empty_like(uu) if z is not None else np.empty((0, 0, 0), f)
    dA_p, dD_p, dbias_p = np.zeros((nc, ne, nn), f), np.zeros((nc, ne), f), np.zeros((nc, ne), f)
    dBt_p, dCt_p = np.zeros((nc, nb, L, nn), f), np.zeros((nc, nb, L, nn), f)
    scan_bwd_kernel(uu, dt, dsp, AA, Bt, Ct, DD, zz, zsig, _np(gout, cdt), nc,
                    du, ddelta, dz, dA_p, dBt_p, dCt_p, dD_p, dbias_p)
    t = torch.from_numpy

    def red(x):  # sum the chunk slices (a no-op copy-free view for one chunk)
        return t(x[0]) if nc == 1 else t(x).sum(0)

    return (t(du), t(ddelta), red(dA_p), red(dBt_p).transpose(1, 2), red(dCt_p).transpose(1, 2),
            red(dD_p) if D is not None else None, t(dz) if z is not None else None,
            red(dbias_p) if delta_bias is not None else None)
