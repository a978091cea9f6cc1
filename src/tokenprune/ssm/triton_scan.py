"""GPU selective scan in Triton: our fast CUDA path when mamba-ssm is not installed.

mamba-ssm ships prebuilt kernels for a few torch/CUDA pairs only; elsewhere it must be compiled (tens of
minutes). Triton comes with torch's CUDA wheels, so this path works wherever torch sees a GPU.

Only the recurrence is a kernel (``scan_core``): h_t = exp(dt_t·A)·h_{t-1} + dt_t·B_t·u_t, y_t = <h_t, C_t>.
softplus, delta_bias, D and the SiLU(z) gate are elementwise torch ops around it (autograd does their
backward), which keeps the kernels small. One program owns a (batch row, block of channels) with all N
states in registers and walks the sequence. Training saves the state only every ``CHUNK`` steps; the
backward walks the chunks in reverse, recomputes each chunk's states into a per-program scratch buffer and
runs the reverse recurrence, so memory is O(b·E·N·(L/CHUNK + CHUNK)) rather than O(b·E·N·L).
Gradients shared across channels (B, C) are written per channel block and summed in torch (no atomics).

``TRITON_INTERPRET=1`` (set before the first use) runs the same kernels on CPU tensors; the tests use it.
"""
import os

import torch
import torch.nn.functional as F

CHUNK = 32
BLOCK_E = 32

_kernels = {}


def triton_available():
    """Triton importable, and either a GPU or the interpreter to run on."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or interpreting()


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _build():
    # Kernels are defined on first use so that importing this module never needs triton.
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(u, su_b, su_e, su_l, dt, sd_b, sd_e, sd_l, bias, A, B, sb_b, sb_n, sb_l, C, sc_b, sc_n, sc_l,
            D, z, sz_b, sz_e, sz_l, y, hchk, E, N, L, NCHUNK,
            SAVE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
            HAS_Z: tl.constexpr, CH: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr):
        # Strided inputs (no copies of x_proj's B/C slices); y is contiguous (b, E, L). The softplus/bias,
        # D and SiLU(z) options fuse the elementwise ops of inference into the scan (training passes them
        # off and lets autograd handle them around the kernel).
        b, eb = tl.program_id(0), tl.program_id(1)
        e = eb * BE + tl.arange(0, BE)
        n = tl.arange(0, BN)
        me, mn = e < E, n < N
        m2 = me[:, None] & mn[None, :]
        a = tl.load(A + e[:, None] * N + n[None, :], mask=m2, other=0.0)
        if HAS_BIAS:
            d_bias = tl.load(bias + e, mask=me, other=0.0)
        if HAS_D:
            d_skip = tl.load(D + e, mask=me, other=0.0)
        pu, pd, pz = u + b * su_b + e * su_e, dt + b * sd_b + e * sd_e, z + b * sz_b + e * sz_e
        pb, pc = B + b * sb_b + n * sb_n, C + b * sc_b + n * sc_n
        row = (b * E + e) * L  # (BE,) offsets of y[b, e, 0]
        h = tl.zeros((BE, BN), dtype=tl.float32)
        for t in range(L):
            if SAVE:
                if t % CH == 0:  # state before chunk t // CH
                    tl.store(hchk + ((b * E + e[:, None]) * NCHUNK + t // CH) * N + n[None, :], h, mask=m2)
            u_t = tl.load(pu + t * su_l, mask=me, other=0.0).to(tl.float32)
            d_t = tl.load(pd + t * sd_l, mask=me, other=0.0).to(tl.float32)
            if HAS_BIAS:
                d_t += d_bias
            if SOFTPLUS:
                d_t = tl.where(d_t > 20.0, d_t, tl.log(1.0 + tl.exp(d_t)))
            b_t = tl.load(pb + t * sb_l, mask=mn, other=0.0).to(tl.float32)
            c_t = tl.load(pc + t * sc_l, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(d_t[:, None] * a) * h + (d_t * u_t)[:, None] * b_t[None, :]
            y_t = tl.sum(h * c_t[None, :], axis=1)
            if HAS_D:
                y_t += d_skip * u_t
            if HAS_Z:
                z_t = tl.load(pz + t * sz_l, mask=me, other=0.0).to(tl.float32)
                y_t = y_t * z_t / (1.0 + tl.exp(-z_t))
            tl.store(y + row + t, y_t, mask=me)

    @triton.jit
    def bwd(u, dt, A, B, C, gy, hchk, scratch, du, ddt, dA, dB, dC, E, N, L, NCHUNK, NEB,
            CH: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr):
        b, eb = tl.program_id(0), tl.program_id(1)
        e = eb * BE + tl.arange(0, BE)
        n = tl.arange(0, BN)
        me, mn = e < E, n < N
        m2 = me[:, None] & mn[None, :]
        a = tl.load(A + e[:, None] * N + n[None, :], mask=m2, other=0.0)
        row = (b * E + e) * L
        bc = b * N * L + n * L
        part = ((b * NEB + eb) * N + n) * L  # (BN,) offsets of dB/dC partials [b, eb, n, 0]
        # this program's scratch: (CH + 1, BE, BN); slot k holds the state before step k of the chunk
        scr = scratch + (b * NEB + eb) * (CH + 1) * BE * BN
        tile = tl.arange(0, BE)[:, None] * BN + n[None, :]
        dh = tl.zeros((BE, BN), dtype=tl.float32)
        da = tl.zeros((BE, BN), dtype=tl.float32)
        for i in range(NCHUNK):
            c = NCHUNK - 1 - i
            t0 = c * CH
            h = tl.load(hchk + ((row[:, None] // L) * NCHUNK + c) * N + n[None, :], mask=m2, other=0.0)
            tl.store(scr + tile, h)
            for k in range(CH):  # recompute the chunk's states
                t = t0 + k
                if t < L:
                    u_t = tl.load(u + row + t, mask=me, other=0.0)
                    d_t = tl.load(dt + row + t, mask=me, other=0.0)
                    b_t = tl.load(B + bc + t, mask=mn, other=0.0)
                    h = tl.exp(d_t[:, None] * a) * h + (d_t * u_t)[:, None] * b_t[None, :]
                    tl.store(scr + (k + 1) * BE * BN + tile, h)
            tl.debug_barrier()
            for j in range(CH):  # reverse recurrence over the chunk
                k = CH - 1 - j
                t = t0 + k
                if t < L:
                    h_prev = tl.load(scr + k * BE * BN + tile)
                    h_t = tl.load(scr + (k + 1) * BE * BN + tile)
                    u_t = tl.load(u + row + t, mask=me, other=0.0)
                    d_t = tl.load(dt + row + t, mask=me, other=0.0)
                    b_t = tl.load(B + bc + t, mask=mn, other=0.0)
                    c_t = tl.load(C + bc + t, mask=mn, other=0.0)
                    g_t = tl.load(gy + row + t, mask=me, other=0.0)
                    tl.store(dC + part + t, tl.sum(g_t[:, None] * h_t, axis=0), mask=mn)
                    dh += g_t[:, None] * c_t[None, :]
                    decay = tl.exp(d_t[:, None] * a)
                    ddt_t = tl.sum(dh * (a * decay * h_prev + b_t[None, :] * u_t[:, None]), axis=1)
                    tl.store(ddt + row + t, ddt_t, mask=me)
                    tl.store(du + row + t, tl.sum(dh * b_t[None, :], axis=1) * d_t, mask=me)
                    tl.store(dB + part + t, tl.sum(dh * (d_t * u_t)[:, None], axis=0), mask=mn)
                    da += dh * decay * h_prev * d_t[:, None]
                    dh = dh * decay
            tl.debug_barrier()
        tl.store(dA + (b * E + e[:, None]) * N + n[None, :], da, mask=m2)

    return fwd, bwd


def _get():
    key = interpreting()
    if key not in _kernels:
        _kernels[key] = _build()
    return _kernels[key]


def _launch_shape(u, A):
    import triton
    b, E, L = u.shape
    N = A.shape[1]
    return b, E, L, N, triton.next_power_of_2(N), triton.cdiv(E, BLOCK_E), triton.cdiv(L, CHUNK)


def _f32(x):
    return x.to(torch.float32).contiguous()


class ScanCore(torch.autograd.Function):
    """y = scan(u, dt, A, B, C) in float32; u, dt (b, E, L), A (E, N), B, C (b, N, L)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        fwd, _ = _get()
        u, dt, A, B, C = map(_f32, (u, dt, A, B, C))
        b, E, L, N, BN, neb, nchunk = _launch_shape(u, A)
        save = any(ctx.needs_input_grad)
        hchk = u.new_empty((b, E, nchunk, N) if save else (1,))
        y = torch.empty_like(u)
        fwd[(b, neb)](u, *u.stride(), dt, *dt.stride(), u, A, B, *B.stride(), C, *C.stride(), u, u, 0, 0, 0,
                      y, hchk, E, N, L, nchunk, SAVE=save, SOFTPLUS=False, HAS_BIAS=False, HAS_D=False,
                      HAS_Z=False, CH=CHUNK, BE=BLOCK_E, BN=BN)
        if save:
            ctx.save_for_backward(u, dt, A, B, C, hchk)
        return y

    @staticmethod
    def backward(ctx, gy):
        _, bwd = _get()
        u, dt, A, B, C, hchk = ctx.saved_tensors
        b, E, L, N, BN, neb, nchunk = _launch_shape(u, A)
        gy = _f32(gy)
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dA = u.new_empty((b, E, N))
        dB, dC = u.new_empty((b, neb, N, L)), u.new_empty((b, neb, N, L))
        scratch = u.new_empty((b, neb, CHUNK + 1, BLOCK_E, BN))
        bwd[(b, neb)](u, dt, A, B, C, gy, hchk, scratch, du, ddt, dA, dB, dC, E, N, L, nchunk, neb,
                      CH=CHUNK, BE=BLOCK_E, BN=BN)
        return du, ddt, dA.sum(0), dB.sum(1), dC.sum(1)


def scan_core(u, dt, A, B, C):
    return ScanCore.apply(u, dt, A, B, C)


def fused_scan_inference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """No autograd: one kernel does softplus/bias, the scan, D and the SiLU(z) gate, reading the inputs
    through their strides (no copies). Output in u's dtype."""
    fwd, _ = _get()
    b, E, L, N, BN, neb, nchunk = _launch_shape(u, A)
    y = torch.empty((b, E, L), device=u.device, dtype=torch.float32)
    A = _f32(A)
    zz = z if z is not None else u
    fwd[(b, neb)](u, *u.stride(), delta, *delta.stride(),
                  _f32(delta_bias) if delta_bias is not None else A, A, B, *B.stride(), C, *C.stride(),
                  _f32(D) if D is not None else A, zz, *zz.stride(), y, y, E, N, L, nchunk,
                  SAVE=False, SOFTPLUS=bool(delta_softplus), HAS_BIAS=delta_bias is not None,
                  HAS_D=D is not None, HAS_Z=z is not None, CH=CHUNK, BE=BLOCK_E, BN=BN)
    return y.to(u.dtype)


def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """``selective_scan_fn`` semantics (see ``selective_scan_reference``), computed in float32."""
    args = (u, delta, A, B, C, D, z, delta_bias)
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args)):
        return fused_scan_inference(*args, delta_softplus=delta_softplus)
    out_dtype = u.dtype
    u32 = u.float()
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    y = scan_core(u32, dt, A.float(), B.float(), C.float())
    if D is not None:
        y = y + u32 * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)
