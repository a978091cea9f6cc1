"""Run-time dispatch of the selective scan, and the autograd Function around it.

The "cpu" (numba) and "cuda" (mamba-ssm) paths run inside one ``torch.autograd.Function``
named ``SelectiveScan``, so ``torch.jit.trace`` (and fvcore) sees a single ``prim::PythonOp``
node whose ``pyname()`` is "SelectiveScan". "triton" (our chunked GPU kernels, the default on
CUDA) is the custom op ``tokenprune::scan_fwd`` (``fused_ops``), which torch.compile and CUDA
graphs see as one node. "reference" is the plain PyTorch loop.
"""
import contextlib
import os
import threading
import warnings

import torch

from ..compat import jit_tracing_state, set_jit_tracing_state
from .reference import selective_scan_reference

IMPLS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "TOKENPRUNE_SCAN"

_lock = threading.Lock()
_state = {"default": None, "last": None, "counts": {name: 0 for name in IMPLS}}


def _check_name(name, source):
    if name not in IMPLS:
        raise ValueError(f"unknown selective-scan impl {name!r} (from {source}); "
                         f"expected one of {list(IMPLS)} or None for automatic")
    return name


def set_scan_impl(name):
    """Set the impl used when ``impl=None`` (None or "auto": back to automatic).

    Takes precedence over the ``TOKENPRUNE_SCAN`` environment variable."""
    if name == "auto":
        name = None
    _state["default"] = None if name is None else _check_name(name, "set_scan_impl")


def get_scan_impl(u=None):
    """The configured impl (set_scan_impl, else $TOKENPRUNE_SCAN); "auto" if none.

    With a tensor ``u``, the automatic choice for it is resolved as well."""
    name = _state["default"]
    if name is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            name = _check_name(env, f"${ENV_VAR}")
    if u is not None and u.device.type == "meta" and name in (None, "cpu", "cuda"):
        return "triton"  # shape-only runs go through the custom ops' fake implementations
    if name is not None or u is None:
        return name or "auto"
    if u.is_cuda and u.dtype == torch.float64:  # the GPU kernels compute in fp32
        return "reference"
    if u.is_cuda:  # ours in Triton (bf16, fused directions and gaps), else mamba-ssm's kernels, else the loop
        if triton_available():
            return "triton"
        return "cuda" if mamba_available() else "reference"
    return "cpu" if numba_available() else "reference"


@contextlib.contextmanager
def scan_impl(name):
    """Temporarily set the default impl: ``with scan_impl("reference"): ...``."""
    previous = _state["default"]
    set_scan_impl(name)
    try:
        yield
    finally:
        _state["default"] = previous


def scan_impl_report():
    """Which impl ran last, how often each ran, and the current configuration."""
    with _lock:
        report = {"last": _state["last"], "counts": dict(_state["counts"])}
    report.update(default=get_scan_impl(), mamba_ssm=mamba_available(),
                  numba=numba_available(), triton=triton_available())
    if report["numba"] and report["counts"]["cpu"]:
        import numba
        report["numba_threading_layer"] = numba.threading_layer()
    return report


def reset_scan_impl_report():
    with _lock:
        _state["last"] = None
        _state["counts"] = {name: 0 for name in IMPLS}


def _record(name):
    with _lock:
        _state["last"] = name
        _state["counts"][name] += 1


# ---- optional back-ends (imported lazily; never required) -----------------

_cache = {}


def _mamba_fn():
    if "mamba" not in _cache:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception:  # ImportError, or a CUDA extension that fails to load
            selective_scan_fn = None
        _cache["mamba"] = selective_scan_fn
    return _cache["mamba"]


def mamba_available():
    return _mamba_fn() is not None


def triton_available():
    if "triton" not in _cache:
        from .triton_scan import triton_available as available
        _cache["triton"] = available()
    return _cache["triton"]


def triton_build_errors():
    """Exceptions of a Triton kernel that cannot be built for this GPU (compiler error, too many resources)."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except Exception:  # noqa: BLE001  (triton absent or reorganised: nothing to catch)
        return ()
    return (CompilationError, OutOfResources)


def disable_triton(exc):
    """Automatic dispatch stops using the Triton kernels for this process (mamba-ssm or the reference loop
    instead), with a warning that names the error: a kernel that does not build must not stop a run that
    did not ask for it. An explicit impl="triton" still raises."""
    warnings.warn(f"tokenprune: the Triton scan kernels failed to build on this device ({type(exc).__name__}: "
                  f"{exc}); automatic dispatch falls back to mamba-ssm or the reference scan", RuntimeWarning)
    _cache["triton"] = False


def on_triton(x, fn, *args, **kwargs):
    """fn(*args, **kwargs) when the scan for tensor x resolves to "triton" (a model's fused GPU path), else None.

    Also None when fn's Triton kernels fail to build on this device under automatic dispatch: Triton is then
    switched off (disable_triton) and the caller runs its unfused ops; a configured "triton" raises."""
    if get_scan_impl(x) != "triton":
        return None
    try:
        return fn(*args, **kwargs)
    except triton_build_errors() as exc:
        if get_scan_impl() != "auto":
            raise
        disable_triton(exc)
        return None


def numba_available():
    if "numba" not in _cache:
        try:
            from . import cpu_kernel  # noqa: F401
            _cache["numba"] = True
        except ImportError:
            _cache["numba"] = False
    return _cache["numba"]


# ---- the autograd Function ------------------------------------------------

def _graph_forward(ctx, fn, args, softplus):
    # mamba-ssm's public selective_scan_fn (and our Triton composite) is itself
    # differentiable; build its graph on detached leaves here and differentiate it
    # in backward, so only mamba-ssm's stable public API is used (not
    # selective_scan_cuda.fwd/bwd).
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_(need)
                  for x, need in zip(args, ctx.needs_input_grad)]
        out = fn(*leaves, delta_softplus=softplus)
    if not out.requires_grad:  # no input needs a gradient: keep no graph
        return out
    ctx.graph = (leaves, out)
    return out.detach()


def _graph_backward(ctx, gout):
    leaves, out = ctx.graph
    del ctx.graph
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, gout) if wanted else ())
    return [next(grads) if x is not None and x.requires_grad else None for x in leaves]


@contextlib.contextmanager
def _quiet_trace(untraced: bool):
    """Under torch.jit.trace the Function is one prim::PythonOp (what the FLOP handle counts), and the tracer
    also records the ops of its forward into a subgraph of that node, warning that the numpy round trips
    are constants. ``untraced`` (tracing without grad, as FLOP counting does) stops recording them: that
    took half the time of counting a ViM's FLOPs. With grad the subgraph must see the output made, so the
    ops stay recorded and only the warnings are silenced."""
    state = jit_tracing_state()
    if state is None:
        yield
        return
    if untraced:
        set_jit_tracing_state(None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        set_jit_tracing_state(state)


class SelectiveScan(torch.autograd.Function):
    """One Function for the fast paths (fvcore: prim::PythonOp.SelectiveScan)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl, untraced=False):
        # delta_bias arrives as (E, 1) so the FLOP handle, which sees only the tensor inputs, can tell it
        # from D (E,) when some optional inputs are None
        ctx.bias_shape = None if delta_bias is None else delta_bias.shape
        delta_bias = None if delta_bias is None else delta_bias.reshape(-1)
        ctx.impl, ctx.softplus = impl, bool(delta_softplus)
        args = (u, delta, A, B, C, D, z, delta_bias)
        with _quiet_trace(untraced):
            if impl == "cuda":
                return _graph_forward(ctx, _mamba_fn(), args, ctx.softplus)
            from .cpu_kernel import cpu_scan_forward
            ctx.save_for_backward(*args)
            out = cpu_scan_forward(*args, delta_softplus=ctx.softplus)
            return out.to(device=u.device, dtype=u.dtype)

    @staticmethod
    def backward(ctx, gout):
        if ctx.impl == "cuda":
            grads = _graph_backward(ctx, gout)
        else:
            from .cpu_kernel import cpu_scan_backward
            args = ctx.saved_tensors
            grads = cpu_scan_backward(gout, *args, delta_softplus=ctx.softplus)
            grads = [None if g is None or not need else g.to(device=x.device, dtype=x.dtype)
                     for g, x, need in zip(grads, args, ctx.needs_input_grad)]
        grads = list(grads)
        if grads[7] is not None:
            grads[7] = grads[7].reshape(ctx.bias_shape)  # the (E, 1) the op was given
        return (*grads, None, None, None)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, E, L), got shape {tuple(u.shape)}")
    b, e, L = u.shape
    n = A.shape[-1] if A.dim() == 2 else -1
    expected = {"delta": (delta, (b, e, L)), "A": (A, (e, n)), "B": (B, (b, n, L)),
                "C": (C, (b, n, L)), "D": (D, (e,)), "z": (z, (b, e, L)),
                "delta_bias": (delta_bias, (e,))}
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(x.shape)}, expected "
                             f"{shape} for u of shape (batch, E, L) = {(b, e, L)} and "
                             f"A of shape (E, N) = {tuple(A.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, impl=None):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics (see
    ``selective_scan_reference``); ``impl`` in {"reference", "cpu", "cuda", "triton"} or
    None for the configured/automatic choice (``get_scan_impl(u)``)."""
    name = get_scan_impl(u) if impl is None else _check_name(impl, "impl argument")
    if not torch.jit.is_tracing():  # traced sizes are tensors: comparing them warns
        _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if name == "cuda" and not (mamba_available() and u.is_cuda):
        raise RuntimeError(
            "selective_scan impl 'cuda' needs mamba-ssm (pip install -e .[cuda]) and CUDA "
            f"tensors; mamba-ssm importable: {mamba_available()}, u.device: {u.device}. "
            f"Use impl='cpu' or 'reference' (or ${ENV_VAR}) instead.")
    if name == "triton" and not (u.device.type == "meta" or (triton_available() and (u.is_cuda or _interpreting()))):
        raise RuntimeError(
            "selective_scan impl 'triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            f"tensors); triton usable: {triton_available()}, u.device: {u.device}. "
            f"Use impl='cpu' or 'reference' (or ${ENV_VAR}) instead.")
    if name == "cpu" and not numba_available():
        raise RuntimeError("selective_scan impl 'cpu' needs numba (pip install numba)")
    _record(name)
    if name == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if name == "triton":  # a torch.library custom op with its own autograd (see fused_ops)
        from .fused_ops import fused_selective_scan
        if u.dtype == torch.float64:  # Triton computes in fp32: keep fp64 callers on fp64 semantics' dtype
            raise ValueError("selective_scan impl 'triton' computes in float32; got float64 inputs "
                             "(use impl='reference' for float64)")
        try:
            return fused_selective_scan(u[None], delta[None], A, B[None], C[None], D, z, delta_bias,
                                        softplus=bool(delta_softplus), out_dtype=u.dtype)
        except triton_build_errors() as exc:
            if impl is not None or get_scan_impl() != "auto":
                raise
            disable_triton(exc)
            return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    bias_2d = None if delta_bias is None else delta_bias.unsqueeze(-1)
    untraced = torch.jit.is_tracing() and not torch.is_grad_enabled()  # inside forward grad is always off
    return SelectiveScan.apply(u, delta, A, B, C, D, z, bias_2d, bool(delta_softplus), name, untraced)


def _interpreting():
    from .triton_scan import interpreting
    return interpreting()


def scan_flops(L, E, N, with_D):
    """FLOPs of one selective scan, one multiply-add = one FLOP: 9·L·E·N, plus L·E for the D term (the count of
    ``tokenprune.flops``' scan handle; docs/CONVENTIONS.md, "FLOPs")."""
    return 9 * L * E * N + (L * E if with_D else 0)


__all__ = ["IMPLS", "SelectiveScan", "selective_scan", "selective_scan_reference",
           "set_scan_impl", "get_scan_impl", "scan_impl", "scan_impl_report",
           "reset_scan_impl_report", "scan_flops"]
