"""On a GPU, every method on a small ViM and DeiT gives what it gives on CPU: same kept tokens, same logits
to float tolerance; our ViT path equals timm's there too, and keep 1.0 stays bit-identical. Skipped on CPU."""
import copy

import pytest
import timm
import torch

import tokenprune
from tokenprune.bench import compare_throughput
from tokenprune.pruning import METHODS
from tokenprune.ssm import scan_impl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("no_tf32")]

BACKBONES = {"ssm": "vim_test_patch4_32", "vit": "deit_test_patch4_32"}


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family", ["ssm", "vit"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_gives_the_same_logits_on_gpu(method, family, images):
    if family not in METHODS[method].families or method == "random":
        pytest.skip("not applicable (random draws differ between devices by design)")
    torch.manual_seed(1)
    kw = {"proposal": timm.create_model("papr_convnet_micro").eval()} if method.startswith("papr") else {}
    cpu = tokenprune.create_model(timm.create_model(BACKBONES[family]), method, keep=0.6, **kw).eval()
    gpu = copy.deepcopy(cpu).cuda()
    with torch.no_grad(), scan_impl("reference"):
        ref = cpu(images)
    with torch.no_grad(), scan_impl("triton" if family == "ssm" else None):
        out = gpu(images.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))


def test_vit_wrapper_equals_timm_on_gpu(images):
    vit = timm.create_model("deit_test_patch4_32").eval().cuda()
    x = images.cuda()
    with torch.no_grad():
        assert torch.equal(tokenprune.create_model(vit)(x), vit(x))
        for method in ("evit", "tome", "visionzip"):
            assert torch.equal(tokenprune.create_model(vit, method, keep=1.0)(x), vit(x)), method


def test_vim_keep_one_is_bit_identical_on_gpu(images):
    vim = timm.create_model("vim_test_patch4_32").eval().cuda()
    x = images.cuda()
    with torch.no_grad(), scan_impl("triton"):
        ref = vim(x)
        for method in ("l2", "top", "hsa"):
            assert torch.equal(tokenprune.create_model(vim, method, keep=1.0)(x), ref), method


def test_gpu_throughput_of_pruned_vs_unpruned():
    vit = timm.create_model("deit_test_patch4_32")
    res = compare_throughput({"unpruned": tokenprune.create_model(vit),
                              "l2 0.5": tokenprune.create_model(vit, "l2", keep=0.5)},
                             input_size=(3, 32, 32), batch_size=32, warmup=10, iters=30, device="cuda",
                             reference="unpruned")
    assert res["models"]["unpruned"]["device"].startswith("cuda")
    assert res["models"]["unpruned"]["peak_mem_mb"] > 0
    assert res["speedup"]["unpruned"] == 1.0
    for r in res["models"].values():  # the launch-bound check ran on the GPU (tokenprune.bench.host_time)
        assert r["host_ms_per_batch"] > 0 and r["gpu_ms_per_batch"] > 0 and r["host_over_gpu"] > 0


def test_host_and_gpu_time_tell_launch_bound_from_gpu_bound():
    """Hundreds of tiny kernels: the host is slower than the GPU (ratio > 1), yet the GPU time is taken
    without host gaps, far below the host time. A few large matmuls: the GPU is slower (ratio < 0.5), and the
    gap-free GPU time agrees with CUDA events around back-to-back calls. A host sync in the call is seen."""
    from tokenprune.bench.host_time import host_and_gpu_ms
    small = torch.ones(16, device="cuda")
    big = torch.randn(4096, 4096, device="cuda")

    def tiny_kernels():
        y = small
        for _ in range(500):  # well inside CUDA's launch queue, so queuing never blocks
            y = y + 1
        return y

    def matmuls():
        return big @ big @ big @ big

    launch = host_and_gpu_ms(tiny_kernels, "cuda")
    assert launch["gapless"] and launch["host_over_gpu"] > 1.0, launch
    heavy = host_and_gpu_ms(matmuls, "cuda")
    assert heavy["gapless"] and heavy["host_over_gpu"] < 0.5, heavy
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    matmuls()
    torch.cuda.synchronize()
    t0.record()
    for _ in range(10):
        matmuls()
    t1.record()
    torch.cuda.synchronize()
    assert abs(heavy["gpu_ms"] / (t0.elapsed_time(t1) / 10) - 1) < 0.2, heavy
    synced = host_and_gpu_ms(lambda: (small + 1).sum().item(), "cuda", repeats=2, max_retries=1)
    assert synced["gapless"] is False, synced
