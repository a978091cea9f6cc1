"""The fused Triton scan/conv custom ops (``tokenprune.ssm.fused_ops``) and ViM's fused mixer path.

On CPU the kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before the
kernels are imported); shape-only checks run on the ``meta`` device through the ops' fake implementations;
the `gpu` tests run the same checks compiled, plus whole models, torch.compile and CUDA-graph capture.
"""
import os
import subprocess
import sys

import pytest
import timm
import torch

import tokenprune  # noqa: F401  (registers the models)
from tokenprune.ssm import scan_impl
from tokenprune.ssm.fused_norm import add_rms_norm
from tokenprune.ssm.fused_ops import conv1d_silu, fused_selective_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(script, *args, interpret=True, **extra_env):
    env = {**os.environ, "TOKENPRUNE_SCAN": "", **extra_env}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_interpreted_fused_ops_match_float64_references():
    out = _run("fused_check.py")
    assert out.strip().splitlines()[-1] == "all fused-op checks passed", out
    assert out.count("scan (") == 8 and out.count("conv (") == 6 and out.count("add_rms_norm (") == 4, out
    assert out.count("+idx'") == 2, out  # the index-ordered (PlainMamba) cases ran


@pytest.mark.slow
def test_interpreted_scan_backward_is_right_at_other_tiles():
    # T = 4 and 32 (3 and 5 halving steps in the dB/dC lane sums), BE = 64 and 128 (2 and 4 channel groups)
    out = _run("fused_check.py", "--tiles", "64,4,2", "128,32,4")
    assert out.strip().splitlines()[-1] == "all tile checks passed", out
    assert out.count("scan at tile") == 4, out


@pytest.mark.slow
def test_interpreted_scan_is_right_with_transposed_tiles():
    # the (BE, T) loads and stores that Triton < 3.7 gets (see _transposed_tiles), forced on this Triton
    out = _run("fused_check.py", "--tiles", "32,8,1", TOKENPRUNE_SCAN_TRANSPOSED_TILES="1")
    assert out.strip().splitlines()[-1] == "all tile checks passed", out
    assert out.count("scan at tile") == 2, out


def test_transposed_tiles_follow_the_triton_version(monkeypatch):
    """Triton's coalescing breaks a contiguity tie with the lanes along the first dimension before 3.7 and along
    the last from 3.7 (seen in the sm_90 builds of 3.5.1, 3.6.0, 3.7.1 and 3.8.0): the tiles are transposed
    exactly where needed, and the override is checked."""
    from tokenprune.ssm import _scan_kernels as k
    monkeypatch.delenv("TOKENPRUNE_SCAN_TRANSPOSED_TILES", raising=False)
    for version, transposed in (("3.5.1", True), ("3.6.0", True), ("3.7.1", False), ("3.8.0", False),
                                ("4.0.0", False)):
        monkeypatch.setattr(k.triton, "__version__", version)
        assert k._transposed_tiles() is transposed, version
    monkeypatch.setenv("TOKENPRUNE_SCAN_TRANSPOSED_TILES", "1")
    assert k._transposed_tiles() is True
    monkeypatch.setenv("TOKENPRUNE_SCAN_TRANSPOSED_TILES", "yes")
    with pytest.raises(ValueError, match="TOKENPRUNE_SCAN_TRANSPOSED_TILES='yes'; expected 0 or 1"):
        k._transposed_tiles()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vim_micro_patch8_56", "plainmamba_test_32"])
def test_interpreted_fused_mixer_path_matches_the_reference_model(model):
    out = _run("vim_fused_check.py", "--model", model)
    assert "OK" in out.strip().splitlines()[-1], out
    assert "l2_logits=" in out and "hsa_logits=" in out, out


def _scan_args(ndir=2, b=2, E=8, N=4, L=5, device="meta"):
    t = lambda *s: torch.empty(*s, device=device)  # noqa: E731
    return dict(u=t(ndir, b, E, L), dt=t(ndir, b, E, L), A0=t(E, N), B=t(ndir, b, N, L), C=t(ndir, b, N, L),
                D0=t(E), z=t(b, E, L), bias0=t(E), A1=t(E, N) if ndir == 2 else None,
                D1=t(E) if ndir == 2 else None, bias1=t(E) if ndir == 2 else None)


def test_fake_implementations_give_shapes_dtypes_and_layout_on_meta():
    args = _scan_args()
    y = fused_selective_scan(**args, softplus=True, a_is_log=True)
    assert y.shape == (2, 8, 5) and y.device.type == "meta" and y.dtype == torch.float32
    # the (E, b, L) memory order of a channel-major input is kept: the mixer's out_proj reads it as a view
    cm = torch.empty(2, 8, 2, 5, device="meta").transpose(1, 2)
    args.update(u=cm, dt=cm)
    y = fused_selective_scan(**args, softplus=True, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.stride() == (5, 10, 1)
    x = torch.empty(2, 8, 7, device="meta")
    w = torch.empty(8, 1, 4, device="meta")
    out = conv1d_silu(x, w, torch.empty(8, device="meta"), w, torch.empty(8, device="meta"))
    assert out.shape == (2, 2, 8, 7)


@pytest.mark.parametrize("change, message", [
    (dict(u=torch.empty(2, 8, 5)), r"u must be \(NDIR, batch, E, L\), got shape \(2, 8, 5\)"),
    (dict(dt=torch.empty(2, 2, 8, 6)), r"dt has shape \(2, 2, 8, 6\), expected \(2, 2, 8, 5\)"),
    (dict(A1=None), r"A1 is required exactly when NDIR >= 2 \(NDIR=2\)"),
    (dict(B=torch.empty(2, 2, 3, 5)), r"B has shape \(2, 2, 3, 5\), expected \(2, 2, 4, 5\)"),
    (dict(u=torch.empty(3, 2, 8, 5)), r"NDIR \(u.shape\[0\]\) must be 1 or 2 \(1 to 4 with idx\), got 3"),
    (dict(idx=torch.zeros(2, 2, 4, dtype=torch.long)), r"idx must be an int32/int64 tensor of shape \(2, 2, 5\)"),
    (dict(idx=torch.zeros(2, 2, 5)), r"idx must be an int32/int64 tensor of shape \(2, 2, 5\), got torch.float32"),
    (dict(D1=None), r"D and bias must be given for both directions or neither"),
])
def test_bad_scan_input_is_a_clear_error(change, message):
    args = {k: (v if v is None else torch.empty(v.shape)) for k, v in _scan_args().items()}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fused_selective_scan(**args)


def test_float64_and_mixed_devices_are_refused():
    args = {k: (v if v is None else torch.empty(v.shape)) for k, v in _scan_args().items()}
    with pytest.raises(ValueError, match="u has dtype torch.float64; expected float32, float16 or bfloat16"):
        fused_selective_scan(**{**args, "u": args["u"].double()})
    with pytest.raises(ValueError, match="all inputs must be on one device"):
        fused_selective_scan(**{**args, "z": torch.empty(2, 8, 5, device="meta")})
    with pytest.raises(ValueError, match=r"conv1d_silu: w0 has shape \(8, 3\), expected \(8, 4\)|"
                                         r"conv1d_silu: b0 has shape \(3,\), expected \(8,\)"):
        conv1d_silu(torch.empty(2, 8, 7), torch.empty(8, 4), torch.empty(3))


def test_vim_forward_runs_on_meta_through_the_fake_implementations():
    model = timm.create_model("vim_micro_patch8_56").to("meta").eval()
    x = torch.empty(2, 3, 56, 56, device="meta")
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.num_classes) and out.device.type == "meta"


def test_b_and_c_reach_the_scan_kernels_in_float32():
    """Half-precision B and C are converted once before the kernels (each lane would convert every (step, state):
    2 of 10 SASS instructions per (token, channel, state) of the bf16 forward on sm_90), exactly, as a
    differentiable cast whose gradient comes back in the input's dtype; stride-0 expansions stay expansions."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from tokenprune.ssm.fused_ops import _fp32_rows

    b = torch.randn(2, 3, 4, 5).to(torch.bfloat16).requires_grad_()
    out = _fp32_rows(b)
    assert out.dtype == torch.float32 and torch.equal(out, b.float())
    out.sum().backward()
    assert b.grad.dtype == torch.bfloat16 and torch.equal(b.grad, torch.ones_like(b))
    shared = torch.randn(3, 4, 5).to(torch.bfloat16).unsqueeze(0).expand(4, 3, 4, 5)
    assert _fp32_rows(shared).stride(0) == 0 and torch.equal(_fp32_rows(shared), shared.float())
    f32 = torch.randn(2, 3, 4, 5)
    assert _fp32_rows(f32) is f32

    class ScanDtypes(TorchDispatchMode):  # the dtypes of (u, dt, A0, A1, B, C) at every scan kernel call
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scan_fwd" in str(func):
                self.seen.append(tuple(a.dtype for a in args[:6] if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))
    for name, size in (("vim_micro_patch8_56", 56), ("plainmamba_test_32", 32)):
        model = timm.create_model(name).to("meta", torch.bfloat16).eval()
        with torch.no_grad(), ScanDtypes() as mode:
            model(torch.empty(2, 3, size, size, device="meta", dtype=torch.bfloat16))
        # u and dt in bf16, B and C in fp32
        assert mode.seen and all(d[:2] == (torch.bfloat16,) * 2 and d[-2:] == (torch.float32,) * 2
                                 for d in mode.seen), (name, mode.seen)


def test_add_rms_norm_fake_shapes_and_dtypes_on_meta():
    h = torch.empty(2, 5, 24, device="meta", dtype=torch.bfloat16)
    y, r = add_rms_norm(h, torch.empty(2, 5, 24, device="meta"), torch.empty(24, device="meta"),
                        out_dtype=torch.bfloat16)
    assert y.shape == r.shape == (2, 5, 24) and y.dtype == torch.bfloat16 and r.dtype == torch.float32
    y, r = add_rms_norm(h, None, torch.empty(24, device="meta"))
    assert y.dtype == torch.float32  # the weight's dtype by default


@pytest.mark.parametrize("h, residual, weight, message", [
    ((2, 5, 24), (2, 5, 23), (24,), r"residual has shape \(2, 5, 23\), expected h's \(2, 5, 24\)"),
    ((2, 5, 24), None, (23,), r"weight has shape \(23,\), expected \(24,\)"),
    ((24,), None, (24,), r"h must be \(..., D\) with D > 0, got shape \(24,\)"),
])
def test_bad_add_rms_norm_input_is_a_clear_error(h, residual, weight, message):
    with pytest.raises(ValueError, match=message):
        add_rms_norm(torch.empty(h), None if residual is None else torch.empty(residual), torch.empty(weight))
    with pytest.raises(ValueError, match="h has dtype torch.float64"):
        add_rms_norm(torch.empty(2, 3, dtype=torch.float64), None, torch.empty(3))


def _meta_forward(name):
    """(model, OpCounter) of the second batch-2 forward on `meta`, which dispatches as on a GPU (the fused
    paths); the first one fills the inference caches."""
    from tokenprune.bench.dispatch import OpCounter
    from tokenprune.tokens import value_checks
    model = timm.create_model(name).to("meta").eval()
    x = torch.empty(2, 3, 224, 224, device="meta")
    with torch.no_grad(), value_checks("never"):
        model(x)
        with OpCounter() as ops:
            model(x)
    return model, ops


def test_vim_block_is_at_most_eight_kernels_on_the_gpu_path():
    """ViM-S (fused mixer, fused add + norm, cached stacked x_proj/dt_proj weights): kernel-level ops per
    forward, the launch proxy of the SSM issue (goal: at most 15 per block; 15.4 before the fused add + norm,
    9.2 after, 7.25 with the stacks cached)."""
    _, ops = _meta_forward("vim_small_patch16_224")
    assert ops.by_op["add_rms_norm_fwd"] == 25 and ops.by_op["scan_fwd"] == 24  # 24 blocks + the final norm
    assert "rsqrt" not in ops.by_op and "pow" not in ops.by_op and "stack" not in ops.by_op
    assert ops.kernels <= 8 * 24, f"{ops.kernels} kernels per ViM-S forward"


def test_plainmamba_gpu_path_has_no_layout_copies():
    """PlainMamba-L3: one fused scan per block for all four orders (read and written back by index), channel-major
    from in_proj to out_proj, so no copy, gather or gate kernels (the per-scan path made 45.5 kernels per block,
    one scan per order 30.5, one scan per block 11.5)."""
    model, ops = _meta_forward("plainmamba_l3")
    depth = len(model.layers)
    assert ops.by_op["scan_fwd"] == depth and "clone" not in ops.by_op and "exp" not in ops.by_op
    assert "gather" not in ops.by_op and "index_select" not in ops.by_op and "mul" not in ops.by_op
    assert ops.kernels <= 12 * depth, f"{ops.kernels} kernels per PlainMamba-L3 forward"


# ---- on a GPU -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@gpu
def test_compiled_fused_ops_match_float64_references_on_gpu():
    out = _run("fused_check.py", "--device", "cuda", "--cases", "gpu", interpret=False)
    assert out.strip().splitlines()[-1] == "all fused-op checks passed", out


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model, depth", [("vim_tiny_patch16_224", "24"), ("plainmamba_l1", "6")])
def test_fused_mixer_path_matches_the_reference_on_gpu(model, depth):
    # PlainMamba's reference path loops over 4 x 196 scan steps per block in Python: 6 blocks keep it short
    out = _run("vim_fused_check.py", "--device", "cuda", "--model", model, "--depth", depth, interpret=False)
    assert "OK" in out.strip().splitlines()[-1], out


def _vim_cuda(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", **kwargs).cuda().eval()
    return model, torch.randn(4, 3, 224, 224, device="cuda")


@pytest.mark.gpu
@gpu
def test_torch_compile_through_the_custom_ops_equals_eager():
    model, x = _vim_cuda(depth=4)  # every op of a block, a quarter of the inductor compile time of 24 blocks
    with torch.no_grad(), scan_impl("triton"):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert torch.allclose(compiled, eager, atol=1e-3, rtol=1e-3), (compiled - eager).abs().max()


@pytest.mark.gpu
@gpu
def test_vim_forward_captures_in_a_cuda_graph_without_host_syncs():
    model, x = _vim_cuda()
    with torch.no_grad(), scan_impl("triton"):
        eager = model(x)
        static = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(static)  # warm-up on a side stream, as capture requires
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                out = model(static)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph.replay()
        torch.cuda.synchronize()
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@gpu
def test_bf16_autocast_runs_the_scan_in_bf16_and_stays_close():
    model, x = _vim_cuda()
    with torch.no_grad(), scan_impl("triton"):
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_a_kernel_that_does_not_build_falls_back_to_the_unfused_ops(monkeypatch):
    """on_triton (the fused paths' gate): a build error under automatic dispatch switches Triton off with a
    warning and returns None (the caller runs its unfused ops); a configured "triton" raises it."""
    from triton.runtime.errors import OutOfResources

    from tokenprune.ssm import scan as scan_mod

    def fails():
        raise OutOfResources(1, 0, "shared memory")

    monkeypatch.setitem(scan_mod._cache, "triton", True)
    monkeypatch.delenv("TOKENPRUNE_SCAN", raising=False)  # automatic dispatch
    monkeypatch.setitem(scan_mod._state, "default", None)
    x = torch.empty(2, 3, device="meta")  # resolves to "triton" as on a GPU
    assert scan_mod.on_triton(x, lambda: "fused") == "fused"
    with scan_impl("triton"), pytest.raises(OutOfResources):
        scan_mod.on_triton(x, fails)
    with pytest.warns(RuntimeWarning, match="failed to build on this device"):
        assert scan_mod.on_triton(x, fails) is None
    assert scan_mod.triton_available() is False  # a CUDA tensor now resolves to mamba-ssm or the loop
    assert scan_mod.on_triton(torch.empty(2, 3), lambda: "fused") is None  # CPU: the numba scan, no fused path
