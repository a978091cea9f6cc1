"""Fast CPU selective scan: numba kernels, parallel over (batch x channel).

Layout: u/delta/z are (b, E, L) C-contiguous; B and C are passed transposed to
(b, L, N) so that the inner loop over the state dimension N reads contiguous
memory and LLVM can vectorise it. The forward keeps only the running state
(N floats) per channel. The backward recomputes the states of one channel
into a local (L+1) x N buffer and runs the reverse recurrence; dA/dB/dC/dD/
dbias are shared between channels (or batch rows), so each parallel chunk
accumulates into its own slice and the slices are summed afterwards (no races).

float32 is the fast path (with a vectorisable exp, see below); float64 works
too (scalar np.exp) so gradcheck can verify the backward.
"""
import numpy as np
import numba
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Typed constants: float32 op float32 stays float32, float32 op float64 -> float64,
# so these work for both kernels' dtypes without upcasting the fp32 path.
_ZERO = np.float32(0.0)
_ZERO64 = np.float64(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
# exp(x) = 2^k * exp(r), |r| <= ln2/2; ln2 split hi/lo for an exact k*ln2.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_XMIN = np.float32(-87.0)  # exp(-87) ~ 1.6e-38, still a normal float32
_XMAX = np.float32(88.0)
# Minimax polynomial for (exp(r) - 1 - r) / r^2 on |r| <= ln2/2 (~1 ulp).
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)


def _jit(**kw):
    """njit with an on-disk cache when a cache location is writable."""
    def deco(fn):
        try:
            return njit(cache=True, **kw)(fn)
        except RuntimeError:  # numba: "no locator available" (read-only install)
            return njit(cache=False, **kw)(fn)
    return deco


@intrinsic
def _pow2(typingctx, k):
    # 2**k for an integral float32 k in the normal range [-126, 127] (the clamps below keep it there), built from the exponent bits in 32-bit integer ops.
    # numba would widen int32 arithmetic to int64, and float -> int64 conversion has no AVX2 instruction:
    # that made the exp loop scalar on AVX2-only CPUs (1.4-1.7x slower scans than with this intrinsic).
    if k != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())
    return types.float32(types.float32), codegen


def _exp(x):  # pure-python stand-in; the numba overload below is what runs
    return np.exp(x)


@overload(_exp, inline="always")
def _exp_overload(x):
    if x == types.float32:
        # numba has no SVML here, so np.exp would be a scalar expf call per
        # element; this branch-free version vectorises (AVX2/AVX-512).
        def impl(x):
            x = _XMIN if x < _XMIN else x
            x = _XMAX if x > _XMAX else x
            k = np.floor(x * _LOG2E + _HALF)
            r = x - k * _LN2_HI
            r = r - k * _LN2_LO
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            p = p * r * r + r + _ONE
            return p * _pow2(k)
        return impl
    return lambda x: np.exp(x)


# reassoc lets LLVM vectorise the sums over N; contract allows FMAs. Neither
# assumes finite values, and the result stays within ~1e-6 of the reference.
_FASTMATH = {"reassoc", "contract"}


@_jit(parallel=True, fastmath=_FASTMATH)
def scan_fwd_kernel(u, dt, A, Bt, Ct, D, z, zsig, nchunks, out):
    """out = (C.h + D u) * z * sigmoid(z); dt is already biased/softplus'd."""
    nb, ne, L = u.shape
    nn = A.shape[1]
    has_D, has_z = D.shape[0] > 0, z.shape[0] > 0
    nitems = nb * ne
    for c in prange(nchunks):
        h = np.empty(nn, u.dtype)
        a = np.empty(nn, u.dtype)
        for i in range(c * nitems // nchunks, (c + 1) * nitems // nchunks):
            b, e = i // ne, i % ne
            h[:] = 0
            for t in range(L):
                d = dt[b, e, t]
                for n in range(nn):  # vectorised exp
                    a[n] = _exp(d * A[e, n])
                dtu = d * u[b, e, t]
                y = _ZERO
                for n in range(nn):
                    h[n] = a[n] * h[n] + dtu * Bt[b, t, n]
                    y += Ct[b, t, n] * h[n]
                if has_D:
                    y += D[e] * u[b, e, t]
                if has_z:
                    y *= z[b, e, t] * zsig[b, e, t]
                out[b, e, t] = y


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
    """Kernel inputs; the elementwise softplus/sigmoid run in torch (vectorised)."""
    pre = delta.detach().to(cdt)
    if delta_bias is not None:
        pre = pre + delta_bias.detach().to(cdt)[:, None]
    dt = F.softplus(pre) if delta_softplus else pre
    zsig = torch.sigmoid(z.detach().to(cdt)) if z is not None else None
    arrs = (_np(u, cdt), _np(dt, cdt), _np(A, cdt), _np(B.transpose(1, 2), cdt),
            _np(C.transpose(1, 2), cdt), _np(D, cdt, (0,)), _np(z, cdt, (0, 0, 0)),
            _np(zsig, cdt, (0, 0, 0)))
    return pre, arrs


def cpu_scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Output in the compute dtype (float32, or float64 when u is float64)."""
    cdt = _compute_dtype(u)
    _, arrs = _common(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt)
    out = np.empty(arrs[0].shape, dtype=arrs[0].dtype)
    scan_fwd_kernel(*arrs, _nchunks(u.shape[0] * u.shape[1]), out)
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
