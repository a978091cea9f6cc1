"""The Triton selective scan (our GPU path when mamba-ssm is absent) against the reference loop.

On CPU the kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before
the kernels are built); on a GPU the same check runs compiled, on ViM-sized shapes, and so do whole models.
"""
import os
import subprocess
import sys

import pytest
import timm
import torch

import tokenprune  # noqa: F401  (registers the models)
from tokenprune.ssm import scan_impl, scan_impl_report, selective_scan
from tokenprune.ssm import scan as scan_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "tests", "scripts", "triton_scan_check.py")
triton = pytest.importorskip("triton")


def _check(*args, env=None):
    proc = subprocess.run([sys.executable, CHECK, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_interpreted_kernels_match_the_reference_forward_and_backward():
    out = _check(env={"TRITON_INTERPRET": "1", "TOKENPRUNE_SCAN": ""})
    lines = out.strip().splitlines()
    assert len(lines) == 5, out  # four cases and the summary
    assert "'triton': 8" in lines[-1], out  # both Triton paths (autograd and fused inference) ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(scan_mod._cache, "triton", raising=False)
    x = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="impl 'triton' needs triton and CUDA.*device: cpu"):
        selective_scan(x, x, -torch.ones(4, 2), torch.randn(1, 2, 3), torch.randn(1, 2, 3), impl="triton")


@pytest.mark.parametrize("tile, message", [
    ("32,64,1", r"T=64 must be at most 32"),
    ("32,8,2", r"BE=32 must be a multiple of 32·warps = 64"),
    ("32,6,1", r"TOKENPRUNE_SCAN_TILE='32,6,1': expected 'BE,T\[,warps\]', powers of two"),
])
def test_bad_scan_tiles_are_a_clear_error(monkeypatch, tile, message):
    from tokenprune.ssm import triton_scan
    monkeypatch.setenv("TOKENPRUNE_SCAN_TILE", tile)
    with pytest.raises(ValueError, match=message):
        triton_scan.tile_config(197)


def test_scan_tiles_clamp_t_to_short_sequences(monkeypatch):
    from tokenprune.ssm import triton_scan
    monkeypatch.setenv("TOKENPRUNE_SCAN_TILE", "64,32,2")
    assert triton_scan.tile_config(197) == (64, 32, 2)
    assert triton_scan.tile_config(5) == (64, 8, 2)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_compiled_kernels_match_the_reference_on_vim_shapes():
    out = _check("--device", "cuda", "--cases", "gpu")
    assert "'triton': 10" in out.strip().splitlines()[-1], out


@pytest.mark.gpu
@gpu
def test_cuda_tensors_dispatch_to_triton_without_mamba(monkeypatch):
    monkeypatch.delenv("TOKENPRUNE_SCAN", raising=False)  # conftest pins "cpu" for the CPU suite
    monkeypatch.setitem(scan_mod._cache, "mamba", None)
    x = torch.randn(1, 4, 3, device="cuda")
    assert scan_mod.get_scan_impl(x) == "triton"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_micro_patch8_56"])
def test_vim_forward_and_grads_with_triton_match_the_reference(name, no_tf32):
    torch.manual_seed(0)
    model = timm.create_model(name).cuda()
    size = model.patch_embed.img_size[0] if hasattr(model.patch_embed, "img_size") else 224
    x = torch.randn(2, 3, size, size, device="cuda")
    results = {}
    for impl in ("reference", "triton"):
        model.zero_grad()
        with scan_impl(impl):
            out = model(x)
        out.square().mean().backward()
        results[impl] = (out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert scan_impl_report()["counts"]["triton"] > 0
    (ref, ref_g), (tri, tri_g) = results["reference"], results["triton"]
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert len(ref_g) == len(tri_g)
    for a, b in zip(tri_g, ref_g):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * max(b.abs().max().item(), 1e-6))
