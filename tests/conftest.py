import os

import pytest
import torch

# The CPU suite pins the numba scan (the automatic choice for CPU tensors; pinned, a missing numba fails loudly).
# Not on a GPU machine: there CUDA tensors must reach the scan the gpu tests check (the automatic choice: Triton);
# pinned "cpu", a model on the GPU copied every scan to the host, which no CUDA graph can capture.
if not torch.cuda.is_available():
    os.environ.setdefault("TOKENPRUNE_SCAN", "cpu")

# scripts/run_tests.sh runs the suite on pytest-xdist workers (two on CI's 2 cores); each worker gets its
# share of the cores for torch's intra-op threads, as more would only oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# Modules that start multi-process runs (DDP, a one-node SLURM cluster): one xdist work unit, so they never
# run beside each other (ports, the cluster's daemons, and timing-sensitive signals stay theirs alone).
DISTRIBUTED_MODULES = {"test_slurm_real.py", "test_lit_ddp.py", "test_data_ddp.py", "test_data_cases.py"}


@pytest.fixture
def no_tf32():
    """GPU comparisons in true fp32: cuDNN convolutions default to TF32 (10-bit mantissa), whose rounding turns
    rounding-level differences between two paths' gradients into ~1e-3 ones."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def proposal():
    """The PaPr proposal ConvNet of the test-sized backbones (seeded: the same weights in every module)."""
    import timm

    import tokenprune  # noqa: F401  (registers the model in timm)
    torch.manual_seed(1)
    return timm.create_model("papr_convnet_micro").eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # slow tests first (a stable sort): xdist hands out work in this order, so the longest tests (the Triton
    # interpreter's, minutes each) start at once on different workers instead of ending the run on one
    items.sort(key=lambda item: "slow" not in item.keywords)
    group = pytest.mark.xdist_group("distributed")
    for item in items:
        if item.path.name in DISTRIBUTED_MODULES:
            item.add_marker(group)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
