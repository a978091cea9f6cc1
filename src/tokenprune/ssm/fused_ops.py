"""The Triton scan and conv as ``torch.library`` custom ops, with fake implementations and autograd.

Custom ops (not bare autograd Functions) so that torch.compile, CUDA-graph capture and torch.export see one
opaque node with known output shapes, and ``meta``/fake tensors run through a model without touching data.

Public entry points:
  ``fused_selective_scan(u, dt, A, B, C, ...)``: one or two directions (leading dim NDIR of u, dt, B, C);
      direction 1 walks the sequence backwards; out = silu(z) · mean over directions of (scan + D·u). With an
      index table ``idx``, up to four directions, each scanning the tokens in its own order (PlainMamba).
  ``conv1d_silu(x, w0, b0, w1=None, b1=None)``: silu(causal depthwise conv), and silu(anti-causal conv with
      (w1, b1)) as a second direction: output (NDIR, b, E, L).
Every tensor may be a strided view with unit stride along L; outputs follow the (b, E) memory order of the
input, so the mixer's (E, b, L) layout stays copy-free.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import triton_conv, triton_scan


def _like_bel(ref: torch.Tensor, lead: Tuple[int, ...], dtype) -> torch.Tensor:
    """Empty (*lead, b, E, L) tensor laid out in ref's (b, E) order (ref is a (b, E, L) view)."""
    b, E, L = ref.shape
    if ref.stride(0) >= ref.stride(1):  # batch-major (b, E, L)
        return ref.new_empty((*lead, b, E, L), dtype=dtype)
    x = ref.new_empty((*lead, E, b, L), dtype=dtype)  # channel-major (E, b, L)
    return x.transpose(-3, -2)


def _unit_l(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # the kernels index L with unit stride; anything else is copied once (and is rare: views of matmul outputs
    # along the sequence are unit-stride)
    if x is None or x.stride(-1) == 1 or x.shape[-1] == 1:
        return x
    return x.contiguous()


def _bel_strides(x: torch.Tensor) -> Tuple[int, int]:
    return x.stride(-3), x.stride(-2)


# ---- scan -----------------------------------------------------------------------------------------------

def _scan_shapes(u, A0):
    ndir, b, E, L = u.shape
    N = A0.shape[1]
    return ndir, b, E, L, N


@torch.library.custom_op("tokenprune::scan_fwd", mutates_args=())
def scan_fwd(u: torch.Tensor, dt: torch.Tensor, A0: torch.Tensor, A1: Optional[torch.Tensor],
             B: torch.Tensor, C: torch.Tensor, D0: Optional[torch.Tensor], D1: Optional[torch.Tensor],
             z: Optional[torch.Tensor], bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor],
             gap: Optional[torch.Tensor], idx: Optional[torch.Tensor], softplus: bool, a_is_log: bool,
             save: bool, scale: float, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    import triton
    ndir, b, E, L, N = _scan_shapes(u, A0)
    u, dt, B, C, z, gap, idx = map(_unit_l, (u, dt, B, C, z, gap, idx))
    # one channel per thread, the scans in registers; saving the state before each of the backward's chunks
    be, t, warps = triton_scan.fwd_tile_config(L, save)
    ts = triton_scan.tile_config(L)[1] if save else t
    fwd, _ = triton_scan.kernels()
    nchunk = triton.cdiv(L, ts)
    y = _like_bel(u[0], (), out_dtype)
    hchk = u.new_empty((ndir, b, E, nchunk, N) if save else (1,), dtype=torch.float32)
    states = u.new_empty((b, E, N), dtype=torch.float32)  # carried-state scratch
    zz = z if z is not None else y
    gg = gap if gap is not None else y.new_empty((1, 1, 1))
    any_ = A0
    fwd[(b, triton.cdiv(E, be))](
        u, u.stride(0), *_bel_strides(u), dt, dt.stride(0), *_bel_strides(dt),
        A0, A1 if A1 is not None else A0, bias0 if bias0 is not None else any_,
        bias1 if bias1 is not None else any_, B, B.stride(0), B.stride(1), B.stride(2),
        C, C.stride(0), C.stride(1), C.stride(2), D0 if D0 is not None else any_, D1 if D1 is not None else any_,
        gg, gg.stride(0), gg.stride(1), zz, *_bel_strides(zz), y, *_bel_strides(y), hchk, states,
        *_index_args(idx, gg), E, L, nchunk, float(scale),
        N=N, BN=triton.next_power_of_2(N), BE=be, T=t, TS=ts, NDIR=ndir, SOFTPLUS=softplus,
        HAS_BIAS=bias0 is not None, A_IS_LOG=a_is_log, HAS_D=D0 is not None, HAS_GAP=gap is not None,
        HAS_Z=z is not None, SAVE=save,
        HAS_IDX=idx is not None, FAST=not triton_scan.interpreting(), num_warps=warps,
        **triton_scan.LAUNCH_OPTIONS)
    return y, hchk


def _index_args(idx, dummy):
    # (pointer, direction stride, batch stride) of the (NDIR, b, L) index table; a dummy when there is none
    return (idx, idx.stride(0), idx.stride(1)) if idx is not None else (dummy, 0, 0)


@scan_fwd.register_fake
def _(u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx, softplus, a_is_log, save, scale, out_dtype):
    ndir, b, E, L, N = _scan_shapes(u, A0)
    nchunk = triton_scan.num_chunks(L)  # must equal the real op's: compiled graphs trust these shapes
    hchk = u.new_empty((ndir, b, E, nchunk, N) if save else (1,), dtype=torch.float32)
    return _like_bel(u[0], (), out_dtype), hchk


@torch.library.custom_op("tokenprune::scan_bwd", mutates_args=())
def scan_bwd(u: torch.Tensor, dt: torch.Tensor, A0: torch.Tensor, A1: Optional[torch.Tensor],
             B: torch.Tensor, C: torch.Tensor, D0: Optional[torch.Tensor], D1: Optional[torch.Tensor],
             z: Optional[torch.Tensor], bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor],
             gap: Optional[torch.Tensor], idx: Optional[torch.Tensor], hchk: torch.Tensor, gout: torch.Tensor,
             softplus: bool, a_is_log: bool, scale: float) -> List[torch.Tensor]:
    """[du, ddt, dA (NDIR, E, N), dB, dC, dD (NDIR, E), dz, dbias (NDIR, E)]; absent inputs get empty grads.
    du and ddt per direction (NDIR, b, E, L): inputs shared by the directions come as stride-0 expansions,
    whose gradient autograd sums."""
    import triton
    ndir, b, E, L, N = _scan_shapes(u, A0)
    u, dt, B, C, z, gap, gout, idx = map(_unit_l, (u, dt, B, C, z, gap, gout, idx))
    be, t, warps = triton_scan.tile_config(L)
    nchunk = triton.cdiv(L, t)
    neb = triton.cdiv(E, be)
    npart = triton.cdiv(E, 32)  # dB / dC partial sums, one per 32-channel group (a warp's lanes)
    f32 = torch.float32
    du = u.new_empty((ndir, b, E, L), dtype=u.dtype)
    ddt = u.new_empty((ndir, b, E, L), dtype=dt.dtype)
    dz = u.new_empty((b, E, L), dtype=z.dtype) if z is not None else u.new_empty((1,))
    dBp = u.new_empty((ndir, b, npart, N, L), dtype=f32)
    dCp = u.new_empty((ndir, b, npart, N, L), dtype=f32)
    dAp = u.new_empty((ndir, b, E, N), dtype=f32)
    gscr = u.new_empty((b, E, N), dtype=f32)  # carried-dh scratch
    dDp = u.new_zeros((ndir, b, E), dtype=f32)
    dbp = u.new_zeros((ndir, b, E), dtype=f32)
    _, bwd = triton_scan.kernels()
    any_ = A0
    zz = z if z is not None else gout
    gg = gap if gap is not None else u.new_empty((1, 1, 1))
    bwd[(b, neb)](
        u, u.stride(0), *_bel_strides(u), dt, dt.stride(0), *_bel_strides(dt),
        A0, A1 if A1 is not None else A0, bias0 if bias0 is not None else any_,
        bias1 if bias1 is not None else any_, B, B.stride(0), B.stride(1), B.stride(2),
        C, C.stride(0), C.stride(1), C.stride(2), D0 if D0 is not None else any_, D1 if D1 is not None else any_,
        gg, gg.stride(0), gg.stride(1), zz, *_bel_strides(zz), gout, *_bel_strides(gout), hchk,
        *_index_args(idx, gg), du, ddt, dz, dBp, dCp, dAp, dDp, dbp, gscr, E, L, nchunk, npart, float(scale),
        N=N, BN=triton.next_power_of_2(N), BE=be, T=t, NDIR=ndir, SOFTPLUS=softplus,
        HAS_BIAS=bias0 is not None, A_IS_LOG=a_is_log, HAS_D=D0 is not None, HAS_GAP=gap is not None,
        HAS_Z=z is not None, HAS_IDX=idx is not None, FAST=not triton_scan.interpreting(),
        num_warps=warps, **triton_scan.LAUNCH_OPTIONS)
    return [du, ddt, dAp.sum(1), dBp.sum(2).to(B.dtype), dCp.sum(2).to(C.dtype), dDp.sum(1),
            dz, dbp.sum(1)]


@scan_bwd.register_fake
def _(u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx, hchk, gout, softplus, a_is_log, scale):
    ndir, b, E, L, N = _scan_shapes(u, A0)
    f32 = torch.float32
    dz = u.new_empty((b, E, L), dtype=z.dtype) if z is not None else u.new_empty((1,))
    return [u.new_empty((ndir, b, E, L)), u.new_empty((ndir, b, E, L), dtype=dt.dtype),
            u.new_empty((ndir, E, N), dtype=f32), u.new_empty((ndir, b, N, L), dtype=B.dtype),
            u.new_empty((ndir, b, N, L), dtype=C.dtype), u.new_empty((ndir, E), dtype=f32), dz,
            u.new_empty((ndir, E), dtype=f32)]


def _scan_setup(ctx, inputs, output):
    (u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx, softplus, a_is_log, save, scale, out_dtype) = inputs
    ctx.flags = (softplus, a_is_log, scale)
    ctx.save_for_backward(u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx, output[1])


def _scan_backward(ctx, gy, _ghchk):
    u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx, hchk = ctx.saved_tensors
    if hchk.dim() != 5:
        raise RuntimeError("tokenprune::scan_fwd ran without save=True; its states are needed for backward "
                           "(call fused_selective_scan, which sets it when a gradient is needed)")
    softplus, a_is_log, scale = ctx.flags
    du, ddt, dA, dB, dC, dD, dz, dbias = scan_bwd(u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx, hchk,
                                                  gy, softplus, a_is_log, scale)
    more = A1 is not None  # directions 1.. share (A1, D1, bias1)

    def cast(g, like):
        return None if like is None else g.to(like.dtype)

    def rest(g):  # directions 1.. (a view when there is only one)
        return g[1] if g.shape[0] == 2 else g[1:].sum(0)
    return (du, ddt, cast(dA[0], A0), cast(rest(dA), A1) if more else None, dB, dC,
            cast(dD[0], D0), cast(rest(dD), D1) if more and D1 is not None else None,
            dz if z is not None else None, cast(dbias[0], bias0),
            cast(rest(dbias), bias1) if more and bias1 is not None else None,
            None, None, None, None, None, None, None)  # gap, idx and the non-tensor arguments


torch.library.register_autograd("tokenprune::scan_fwd", _scan_backward, setup_context=_scan_setup)


def _check_scan_inputs(u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx):
    if u.dim() != 4:
        raise ValueError(f"fused_selective_scan: u must be (NDIR, batch, E, L), got shape {tuple(u.shape)}")
    ndir, b, E, L = u.shape
    if ndir not in ((1, 2) if idx is None else (1, 2, 3, 4)):
        raise ValueError(f"fused_selective_scan: NDIR (u.shape[0]) must be 1 or 2 (1 to 4 with idx), got {ndir}")
    if (ndir >= 2) != (A1 is not None):
        raise ValueError(f"fused_selective_scan: A1 is required exactly when NDIR >= 2 (NDIR={ndir})")
    if idx is not None and (tuple(idx.shape) != (ndir, b, L) or idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"fused_selective_scan: idx must be an int32/int64 tensor of shape {(ndir, b, L)}, got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    N = A0.shape[-1]
    expected = {"dt": (dt, (ndir, b, E, L)), "A0": (A0, (E, N)), "A1": (A1, (E, N)), "B": (B, (ndir, b, N, L)),
                "C": (C, (ndir, b, N, L)), "D0": (D0, (E,)), "D1": (D1, (E,)), "z": (z, (b, E, L)),
                "bias0": (bias0, (E,)), "bias1": (bias1, (E,)), "gap": (gap, (ndir, b, L))}
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"fused_selective_scan: {name} has shape {tuple(x.shape)}, expected {shape}")
    devices = {x.device for x in (u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx) if x is not None}
    if len(devices) != 1:
        raise ValueError(f"fused_selective_scan: all inputs must be on one device, got {sorted(map(str, devices))}")
    for name, x in zip(("u", "dt", "B", "C", "z"), (u, dt, B, C, z)):
        if x is not None and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"fused_selective_scan: {name} has dtype {x.dtype}; expected float32, float16 or "
                             "bfloat16 (float64 runs on the reference scan)")
    if ndir >= 2 and ((D0 is None) != (D1 is None) or (bias0 is None) != (bias1 is None)):
        raise ValueError("fused_selective_scan: D and bias must be given for both directions or neither")


def _fp32_rows(x: torch.Tensor) -> torch.Tensor:
    """B or C in float32 (a differentiable cast; stride-0 expansions stay expansions). Every lane of the scan
    kernels reads each (step, state) of B and C, one channel per lane, so half-precision rows were converted
    there per (token, channel, state): 2 of 10 SASS instructions of the bf16 forward's loop over states on sm_90.
    Converted once here they cost N per token against u's, Δ's and z's E (ViM-S: about 1 % more bytes)."""
    if x.dtype == torch.float32:
        return x
    if x.dim() and x.stride(0) == 0:
        return x[:1].float().expand_as(x)
    return x.float()


def fused_selective_scan(u, dt, A0, B, C, D0=None, z=None, bias0=None, *, A1=None, D1=None, bias1=None,
                         gap=None, idx=None, softplus=False, a_is_log=False, scale=None, out_dtype=None):
    """See the module docstring. u, dt: (NDIR, b, E, L); B, C: (NDIR, b, N, L); A*: (E, N) (A_log when
    ``a_is_log``); D*, bias*: (E,); z: (b, E, L); gap: (NDIR, b, L) decay scale per token (1 + gap), in
    token order for both directions. Returns (b, E, L) in ``out_dtype`` (default u's),
    silu(z) · scale · Σ_directions (scan + D·u), scale 1/NDIR by default (ViM's mean).

    ``idx`` (NDIR, b, L) long: scan orders by index (PlainMamba's zig-zags, up to four directions in one launch):
    step j of direction d reads u at token idx[d, :, j] and adds its output there (z gates token order), while
    Δ, B, C and gap are read at step j; without it direction 1 walks the sequence backwards. Directions 1..
    use (A1, D1, bias1). Inputs shared by the directions may be stride-0 expansions."""
    _check_scan_inputs(u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx)
    B, C = _fp32_rows(B), _fp32_rows(C)
    args = (u, dt, A0, A1, B, C, D0, D1, z, bias0, bias1, gap, idx)
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args)
    scale = 1.0 / u.shape[0] if scale is None else float(scale)
    y, _ = scan_fwd(*args, bool(softplus), bool(a_is_log), save, scale, out_dtype or u.dtype)
    return y


# ---- conv -----------------------------------------------------------------------------------------------

@torch.library.custom_op("tokenprune::conv1d_silu_fwd", mutates_args=())
def conv1d_silu_fwd(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: Optional[torch.Tensor],
                    b1: Optional[torch.Tensor]) -> torch.Tensor:
    import triton
    b, E, L = x.shape
    K = w0.shape[-1]
    ndir = 2 if w1 is not None else 1
    x = _unit_l(x)
    out = _like_bel(x, (ndir,), x.dtype)
    be, t = triton_conv.CONV_TILE
    t = min(t, max(16, triton.next_power_of_2(L)))
    fwd, _ = triton_conv.kernels()
    fwd[(b, triton.cdiv(E, be), triton.cdiv(L, t))](
        x, *_bel_strides(x), w0, b0, w1 if w1 is not None else w0, b1 if b1 is not None else b0,
        out, out.stride(0), *_bel_strides(out), E, L, K=K, BE=be, T=t, NDIR=ndir, **triton_scan.LAUNCH_OPTIONS)
    return out


@conv1d_silu_fwd.register_fake
def _(x, w0, b0, w1, b1):
    return _like_bel(x, (2 if w1 is not None else 1,), x.dtype)


@torch.library.custom_op("tokenprune::conv1d_silu_bwd", mutates_args=())
def conv1d_silu_bwd(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: Optional[torch.Tensor],
                    b1: Optional[torch.Tensor], gout: torch.Tensor) -> List[torch.Tensor]:
    """[dx, dw (NDIR, E, K), db (NDIR, E)]"""
    import triton
    b, E, L = x.shape
    K = w0.shape[-1]
    ndir = 2 if w1 is not None else 1
    x, gout = _unit_l(x), _unit_l(gout)
    be, t = triton_conv.CONV_TILE
    t = min(t, max(16, triton.next_power_of_2(L)))
    nt = triton.cdiv(L, t)
    dx = _like_bel(x, (), x.dtype)
    dwp = x.new_empty((ndir, b * nt, E, K), dtype=torch.float32)
    dbp = x.new_empty((ndir, b * nt, E), dtype=torch.float32)
    _, bwd = triton_conv.kernels()
    bwd[(b, triton.cdiv(E, be), nt)](
        x, *_bel_strides(x), w0, b0, w1 if w1 is not None else w0, b1 if b1 is not None else b0,
        gout, gout.stride(0), *_bel_strides(gout), dx, *_bel_strides(dx), dwp, dbp, E, L, b * nt,
        K=K, BE=be, T=t, NDIR=ndir, **triton_scan.LAUNCH_OPTIONS)
    return [dx, dwp.sum(1), dbp.sum(1)]


@conv1d_silu_bwd.register_fake
def _(x, w0, b0, w1, b1, gout):
    ndir = 2 if w1 is not None else 1
    E, K = w0.shape[0], w0.shape[-1]
    f32 = torch.float32
    return [_like_bel(x, (), x.dtype), x.new_empty((ndir, E, K), dtype=f32), x.new_empty((ndir, E), dtype=f32)]


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, gout):
    x, w0, b0, w1, b1 = ctx.saved_tensors
    dx, dw, db = conv1d_silu_bwd(x, w0, b0, w1, b1, gout)
    two = w1 is not None
    return (dx, dw[0].to(w0.dtype), db[0].to(b0.dtype), dw[1].to(w1.dtype) if two else None,
            db[1].to(b1.dtype) if two else None)


torch.library.register_autograd("tokenprune::conv1d_silu_fwd", _conv_backward, setup_context=_conv_setup)


def conv1d_silu(x, w0, b0, w1=None, b1=None):
    """silu(depthwise conv1d) along L of x (b, E, L): causal with (w0, b0) and, if given, anti-causal with
    (w1, b1); weights (E, K) (or Conv1d's (E, 1, K)). Returns (NDIR, b, E, L) in x's dtype."""
    if x.dim() != 3:
        raise ValueError(f"conv1d_silu: x must be (batch, E, L), got shape {tuple(x.shape)}")
    w0 = w0.reshape(w0.shape[0], -1)
    w1 = None if w1 is None else w1.reshape(w1.shape[0], -1)
    E = x.shape[1]
    for name, t, shape in (("w0", w0, (E, w0.shape[-1])), ("b0", b0, (E,)),
                           ("w1", w1, (E, w0.shape[-1])), ("b1", b1, (E,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"conv1d_silu: {name} has shape {tuple(t.shape)}, expected {shape}")
    if (w1 is None) != (b1 is None):
        raise ValueError("conv1d_silu: w1 and b1 go together (the anti-causal direction)")
    return conv1d_silu_fwd(x, w0, b0, w1, b1)
