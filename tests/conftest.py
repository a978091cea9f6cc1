import os

import pytest
import torch

os.environ.setdefault("TOKENPRUNE_SCAN", "cpu")


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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
