"""Capturable forwards: no per-forward CPU tensor and no host synchronisation on the hot path of any preset.

CPU: weights and input on the ``meta`` device, under a dispatch mode that records every op with a CPU tensor
argument or result (a host -> device copy on a GPU); a read-back to the host (.item(), boolean-mask indexing)
raises on meta, so these runs also prove there is none. GPU (``gpu`` marker): every preset runs under
``torch.cuda.set_sync_debug_mode("error")`` and captures in a CUDA graph whose replay equals eager.
"""
import pytest
import timm
import torch

import tokenprune
from tokenprune.bench.dispatch import CpuTensorRecorder
from tokenprune.pruning import METHODS
from tokenprune.ssm import scan_impl
from tokenprune.tokens.state import static_index

BACKBONES = {"deit": "deit_test_patch4_32", "vim": "vim_test_patch4_32", "plainmamba": "plainmamba_test_32"}
FAMILY = {"deit": "vit", "vim": "ssm", "plainmamba": "ssm"}


def presets(name):
    out = [None]
    for m in sorted(METHODS):
        spec = METHODS[m]
        if FAMILY[name] in spec.families and not (name == "plainmamba" and spec.needs_cls):
            out.append(m)
    return out


CASES = [(b, m) for b in BACKBONES for m in presets(b)]


@pytest.fixture(scope="module")
def bases():
    torch.manual_seed(0)
    return {k: timm.create_model(v).eval() for k, v in BACKBONES.items()}


def build(bases, proposal, backbone, method, keep=0.6):
    return tokenprune.create_model(bases[backbone], method, keep=keep if method else 1.0, proposal=proposal).eval()


@pytest.mark.parametrize("backbone,method", CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_forward_on_another_device_makes_no_cpu_tensor(backbone, method, bases, proposal):
    model = build(bases, proposal, backbone, method).to("meta")
    x = torch.empty(2, 3, 32, 32, device="meta")
    rec = CpuTensorRecorder()
    # SSMs: the reference scan is plain torch ops and runs on meta; the numba CPU kernel cannot (see below)
    with scan_impl("reference"), torch.no_grad(), rec:
        logits = model(x)
    assert logits.shape == (2, 10) and logits.device.type == "meta"
    assert rec.hits == [], f"ops with CPU tensors: {sorted(set(rec.hits))}"


def test_vim_with_its_default_scan_runs_on_meta(bases):
    """No scan is forced: on meta, automatic dispatch takes the fused custom ops (their fake implementations),
    as on a GPU, and HSA's gap-aware path runs with no CPU tensor."""
    model = tokenprune.create_model(bases["vim"], "hsa", keep=0.6).eval().to("meta")
    rec = CpuTensorRecorder()
    with torch.no_grad(), rec:
        model(torch.empty(2, 3, 32, 32, device="meta"))
    assert rec.hits == []


def test_static_index_under_compile_never_asks_about_capture(monkeypatch):
    """Under torch.compile an index is built in the graph, for CUDA too, without torch.cuda's capture query:
    Dynamo cannot trace that query (a graph break, an error under fullgraph=True); outside, it is cached."""
    def query():
        raise AssertionError("the capture query was evaluated under torch.compile")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", query)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    built = []
    assert static_index(("probe", 3), "cuda", lambda dev: built.append(dev) or "index") == "index"
    assert static_index(("probe", 3), "cuda", lambda dev: built.append(dev) or "index") == "index"
    assert built == [torch.device("cuda")] * 2  # built each time in the graph, never cached
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    first = static_index(("probe", 3), "cpu", lambda dev: torch.arange(3, device=dev))
    assert static_index(("probe", 3), "cpu", lambda dev: torch.zeros(3)) is first  # eager on CPU: cached


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backbone,method", CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_forward_has_no_sync_and_captures_in_a_cuda_graph(backbone, method, bases, proposal):
    model = build(bases, proposal, backbone, method).cuda()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).cuda()
    static_x = x.clone()
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager = model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream (lazy inits, autotuning) before capture
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)
