"""tokenprune.ssm: the fast CPU scan against the reference loop, dispatch, tracing."""
import warnings

import pytest
import torch

from tokenprune.ssm import (SelectiveScan, get_scan_impl, reset_scan_impl_report, scan_flops,
                            scan_impl, scan_impl_report, selective_scan,
                            selective_scan_reference, set_scan_impl)
from tokenprune.ssm.scan import mamba_available

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def _clean_dispatch(monkeypatch):
    monkeypatch.delenv("TOKENPRUNE_SCAN", raising=False)
    set_scan_impl(None)
    yield
    set_scan_impl(None)


def make_inputs(batch, E, N, L, softplus=True, dtype=torch.float32, seed=0):
    """Realistic scales: Δ ~ N(0,1) (+bias, softplus), A = -exp(N(0,1)), B/C/u/z ~ N(0,1).
    Without softplus Δ must stay positive (else exp(ΔA) > 1 and the scan explodes)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    delta = r(batch, E, L) if softplus else 0.5 * torch.rand(batch, E, L, generator=g)
    bias = r(E) if softplus else 0.1 * torch.rand(E, generator=g)
    xs = dict(u=r(batch, E, L), delta=delta, A=-torch.exp(r(E, N)), B=r(batch, N, L),
              C=r(batch, N, L), D=r(E), z=r(batch, E, L), delta_bias=bias)
    return {k: v.to(dtype) for k, v in xs.items()}


def run(impl, xs, softplus, grad_out=None):
    """Output and the grads of every tensor input (leaves are fresh copies)."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in xs.items()}
    out = selective_scan(**leaves, delta_softplus=softplus, impl=impl)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(grad_out)
    return out.detach(), {k: (v.grad if v is not None else None) for k, v in leaves.items()}


def assert_close_scaled(actual, expected, tol=1e-5, what=""):
    """|a - e| <= tol * max(1, max|e|) + tol * |e|: relative to the tensor's scale,
    since fp32 sums over L and E make tiny entries carry absolute, not relative, error."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=what)


CASES = [  # (batch, E, N, L)
    (2, 8, 4, 1),
    (2, 8, 4, 7),
    (3, 16, 16, 197),
    (1, 4, 4, 1100),  # long sequence, small E/N to keep the loop reference fast
    (1, 40, 4, 9),  # one batch row: the forward splits the channels into blocks (32 + 8 on 2 threads)
    (2, 80, 4, 70),  # over 64 channels: the backward's blocks (48 + 32) share B, C; a partial second tile
]


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "b{}_E{}_N{}_L{}".format(*s))
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "linear"])
@pytest.mark.parametrize("optional", ["all", "none", "D_only", "z_bias"])
def test_cpu_matches_reference(shape, softplus, optional):
    xs = make_inputs(*shape, softplus=softplus)
    drop = {"all": (), "none": ("D", "z", "delta_bias"), "D_only": ("z", "delta_bias"),
            "z_bias": ("D",)}[optional]
    for k in drop:
        xs[k] = None
    out_c, grads_c = run("cpu", xs, softplus)
    out_r, grads_r = run("reference", xs, softplus)
    assert out_c.dtype == torch.float32
    assert_close_scaled(out_c, out_r, what="output")
    for k in NAMES:
        if xs[k] is None:
            assert grads_c[k] is None
        else:
            assert_close_scaled(grads_c[k], grads_r[k], what=f"grad of {k}")


def test_extreme_values_stay_finite_and_match():
    """Softplus above its linear threshold (20), exp(ΔA) underflowing (ΔA < -87),
    and tiny decays: the kernel's clamped exp must agree with torch.exp."""
    xs = make_inputs(2, 8, 4, 33)
    xs["delta"] = 15 * xs["delta"]
    xs["A"] = -torch.exp(3 * torch.randn(8, 4, generator=torch.Generator().manual_seed(3)))
    out_c, grads_c = run("cpu", xs, True)
    out_r, grads_r = run("reference", xs, True)
    assert torch.isfinite(out_c).all()
    assert_close_scaled(out_c, out_r, what="output")
    for k in NAMES:
        assert torch.isfinite(grads_c[k]).all(), k
        assert_close_scaled(grads_c[k], grads_r[k], what=f"grad of {k}")


def test_numba_threads_follow_torch():
    numba = pytest.importorskip("numba")
    xs = make_inputs(2, 8, 4, 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        selective_scan(**xs, impl="cpu")
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_requires_grad_subset_and_noncontiguous():
    xs = make_inputs(2, 8, 4, 9)
    # non-contiguous u, z, B: views with a transposed memory layout
    xs["u"] = xs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    xs["B"] = xs["B"].transpose(1, 2).contiguous().transpose(1, 2)
    xs["z"] = xs["z"][:, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    assert not xs["u"].is_contiguous() and not xs["B"].is_contiguous()
    A = xs["A"].clone().requires_grad_()
    C = xs["C"].clone().requires_grad_()
    args = dict(xs, A=A, C=C)
    out = selective_scan(**args, delta_softplus=True, impl="cpu")
    out.sum().backward()
    ref_A, ref_C = A.detach().clone().requires_grad_(), C.detach().clone().requires_grad_()
    selective_scan_reference(**dict(xs, A=ref_A, C=ref_C), delta_softplus=True).sum().backward()
    assert_close_scaled(A.grad, ref_A.grad)
    assert_close_scaled(C.grad, ref_C.grad)
    with torch.no_grad():  # nothing requires grad: plain forward
        out2 = selective_scan(**xs, delta_softplus=True, impl="cpu")
    assert not out2.requires_grad
    assert_close_scaled(out2, out.detach())


def test_half_precision_io_computes_in_fp32():
    xs = make_inputs(1, 8, 4, 5)
    xs_bf16 = {k: v.to(torch.bfloat16) for k, v in xs.items()}
    out = selective_scan(**xs_bf16, delta_softplus=True, impl="cpu")
    assert out.dtype == torch.bfloat16
    ref = selective_scan_reference(**xs_bf16, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_cpu_gradcheck_float64():
    xs = make_inputs(2, 3, 2, 5, dtype=torch.float64)
    leaves = [xs[k].clone().requires_grad_() for k in NAMES]

    def f(*args):
        return selective_scan(*args, delta_softplus=True, impl="cpu")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert f(*leaves).dtype == torch.float64


def test_dispatch_default_env_and_setter(monkeypatch):
    xs = make_inputs(1, 4, 2, 3)
    assert get_scan_impl() == "auto"
    assert get_scan_impl(xs["u"]) == "cpu"
    reset_scan_impl_report()
    selective_scan(**xs)
    rep = scan_impl_report()
    assert rep["last"] == "cpu" and rep["counts"]["cpu"] == 1

    monkeypatch.setenv("TOKENPRUNE_SCAN", "reference")
    assert get_scan_impl(xs["u"]) == "reference"
    selective_scan(**xs)
    assert scan_impl_report()["last"] == "reference"

    set_scan_impl("cpu")  # the setter wins over the environment
    selective_scan(**xs)
    with scan_impl("reference"):
        assert get_scan_impl() == "reference"
        selective_scan(**xs)
    assert get_scan_impl() == "cpu"
    rep = scan_impl_report()
    assert rep["counts"] == {"reference": 2, "cpu": 2, "cuda": 0, "triton": 0}
    assert rep["last"] == "reference"


def test_unknown_impl_names_the_value(monkeypatch):
    xs = make_inputs(1, 4, 2, 3)
    with pytest.raises(ValueError, match="'mamba'.*reference.*cpu.*cuda.*triton"):
        selective_scan(**xs, impl="mamba")
    with pytest.raises(ValueError, match="'bogus'"):
        set_scan_impl("bogus")
    monkeypatch.setenv("TOKENPRUNE_SCAN", "fast")
    with pytest.raises(ValueError, match="'fast'.*TOKENPRUNE_SCAN"):
        selective_scan(**xs)


def test_bad_shape_is_a_clear_error():
    xs = make_inputs(2, 4, 2, 3)
    xs["B"] = xs["B"][:, :, :2]
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(**xs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_on_cpu_machine_is_a_clear_error():
    xs = make_inputs(1, 4, 2, 3)
    with pytest.raises(RuntimeError, match="mamba-ssm.*CUDA"):
        selective_scan(**xs, impl="cuda")


def test_jit_trace_shows_one_python_op():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A_log = torch.nn.Parameter(torch.randn(6, 4))
            self.D = torch.nn.Parameter(torch.ones(6))

        def forward(self, u, B, C):
            return selective_scan(u, u, -torch.exp(self.A_log), B, C, self.D, z=u,
                                  delta_softplus=True, impl="cpu")

    u, B, C = torch.randn(2, 6, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (u, B, C), check_trace=False)
    ops = [n for n in traced.graph.nodes() if n.kind() == "prim::PythonOp"]
    assert [n.pyname() for n in ops] == ["SelectiveScan"]
    assert issubclass(SelectiveScan, torch.autograd.Function)
    torch.testing.assert_close(traced(u, B, C), model(u, B, C))
    u2, B2, C2 = torch.randn(3, 6, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    torch.testing.assert_close(traced(u2, B2, C2), model(u2, B2, C2))  # re-runs the kernel
    # with grad the tracer records the body of the op into its subgraph; without grad (FLOP counting) the
    # body is not recorded (it cost half of counting a ViM), and the traced model is the same
    body = {n.kind() for n in ops[0].g("Subgraph").nodes()}
    assert "aten::contiguous" in body  # the kernel's inputs as numpy arrays
    with torch.no_grad():
        fast = torch.jit.trace(model, (u, B, C), check_trace=False)
        ops = [n for n in fast.graph.nodes() if n.kind() == "prim::PythonOp"]
        assert [n.pyname() for n in ops] == ["SelectiveScan"]
        assert "aten::contiguous" not in {n.kind() for n in ops[0].g("Subgraph").nodes()}
        torch.testing.assert_close(fast(u2, B2, C2), model(u2, B2, C2))


def test_scan_flops():
    assert scan_flops(197, 384, 16, with_D=False) == 9 * 197 * 384 * 16
    assert scan_flops(197, 384, 16, with_D=True) == 9 * 197 * 384 * 16 + 197 * 384


def test_cuda_path_plumbing_with_a_stand_in(monkeypatch):
    """The "cuda" branch of SelectiveScan (nested autograd around mamba-ssm's
    selective_scan_fn), run on CPU with the reference standing in for mamba-ssm."""
    from tokenprune.ssm import scan as scan_mod

    def fake_mamba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    monkeypatch.setitem(scan_mod._cache, "mamba", fake_mamba)
    xs = make_inputs(2, 8, 4, 6)
    xs["D"] = None
    leaves = {k: None if v is None else v.clone().requires_grad_(k != "B") for k, v in xs.items()}
    out = SelectiveScan.apply(*leaves.values(), True, "cuda")
    out.backward(torch.ones_like(out))
    out_r, grads_r = run("reference", xs, True, grad_out=torch.ones_like(out))
    assert_close_scaled(out.detach(), out_r)
    assert leaves["B"].grad is None
    for k in ("u", "delta", "A", "C", "z", "delta_bias"):
        assert_close_scaled(leaves[k].grad, grads_r[k], what=k)


# importable, not just installed: a mamba-ssm without its dependencies (einops) or with a CUDA extension that
# does not load makes the "cuda" impl unavailable, and the test is skipped, not failed
_has_mamba = mamba_available()


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _has_mamba),
                    reason="needs CUDA and a mamba-ssm that imports (device.txt of the GPU suite says why not)")
@pytest.mark.parametrize("softplus", [True, False])
def test_cuda_matches_reference(softplus):
    xs = {k: v.cuda() for k, v in make_inputs(2, 32, 16, 197, softplus=softplus).items()}
    out_c, grads_c = run("cuda", xs, softplus)
    out_r, grads_r = run("reference", xs, softplus)
    assert scan_impl_report()["counts"]["cuda"] >= 1
    assert_close_scaled(out_c, out_r, tol=1e-4, what="output")
    for k in NAMES:
        assert_close_scaled(grads_c[k], grads_r[k], tol=1e-4, what=f"grad of {k}")
