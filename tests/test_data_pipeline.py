"""Data pipeline on tiny shards: evaluation sees every sample exactly once (any ranks x workers, uneven
shards), training has a fixed number of batches on every rank, corrupt samples are skipped and counted,
and SkippedSampleMonitor counts a full validation pass exactly."""
import logging
import os
import sys
import warnings
from collections import Counter

import lightning as L
import pytest
import torch

from tokenprune.data import (
    EvalShardDataset,
    ShardDataModule,
    SkippedSampleMonitor,
    TrainShardDataset,
    assign_eval_shards,
    batches_per_rank,
)
from tokenprune.data.pipeline import IMAGE_KEYS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from data_helpers import colour, make_indexed_shards  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3)


def dm_for(spec, n_classes, num_workers=0, **kw):
    args = dict(val_shards=spec, image_size=32, resize_size=32, batch_size=4, val_batch_size=3,
                num_workers=num_workers, num_classes=n_classes, mixup=0.0, cutmix=0.0, train_augment="none")
    args.update(kw)
    return ShardDataModule(**args)


def collect(loader):
    labels, colours = [], []
    for x, y in loader:
        labels += y.tolist()
        colours.append((x.mean(dim=(2, 3)) * STD + MEAN) * 255)  # un-normalised flat colour
    return labels, (torch.cat(colours) if colours else torch.zeros(0, 3))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_every_sample_once_uneven_shards(tmp_path, num_workers):
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9))
    dm = dm_for(sh["spec"], sh["total"], num_workers)
    dm.setup("validate")
    assert dm.val_set.num_samples == 16 and dm.val_set.shard_lengths == (5, 2, 9)
    labels, colours = collect(dm.val_dataloader())
    assert sorted(labels) == list(range(16))
    # the image that came with each label is that sample's image (label k <-> colour(k))
    expected = torch.tensor([colour(k) for k in labels], dtype=torch.float32)
    assert (colours - expected).abs().max() < 4
    counts = dm.sample_counts("validation")
    assert counts["ok"] == 16 and counts["skipped"] == 0 and counts["read_error"] == 0


@pytest.mark.parametrize("sizes", [(5, 2, 9), (4,), (1, 3)])
def test_eval_partition_every_sample_once(sizes):
    """assign_eval_shards + EvalAssignment.owns over every (rank, worker): a partition of all samples,
    including more ranks x workers than shards (rank- and worker-level sample striding)."""
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            seen = Counter()
            for rank in range(world):
                for w in range(workers):
                    a = assign_eval_shards(len(sizes), rank, world, w, workers)
                    for s in a.shards:
                        j = 0
                        for i in range(sizes[s]):
                            rank_ok, worker_ok = a.owns(s, i, j, rank, world, w, workers)
                            if not rank_ok:
                                continue
                            j += 1
                            if worker_ok:
                                seen[(s, i)] += 1
            want = {(s, i) for s, n in enumerate(sizes) for i in range(n)}
            assert set(seen) == want and set(seen.values()) == {1}, (sizes, world, workers, seen)


def test_eval_dataset_partition_through_real_workers(tmp_path):
    """EvalShardDataset itself, with real DataLoader workers, for world sizes 1..3 x workers 1..3."""
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9), info=False)
    from tokenprune.data import build_eval_transform

    tf = build_eval_transform(32, 32)
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            labels = []
            for rank in range(world):
                ds = EvalShardDataset(sh["urls"], tf, batch_size=4, rank=rank, world_size=world, num_classes=16)
                # num_workers=0 emulated per worker would skip the worker split; use real workers
                loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
                labels += collect(loader)[0]
            assert sorted(labels) == list(range(16)), (world, workers, sorted(labels))


def test_eval_more_ranks_than_samples_is_fine():
    # 2 shards of 1 sample, 3 ranks x 2 workers: one rank gets nothing, nothing is lost or duplicated
    sizes = (1, 1)
    seen = Counter()
    for rank in range(3):
        for w in range(2):
            a = assign_eval_shards(2, rank, 3, w, 2)
            for s in a.shards:
                j = 0
                for i in range(sizes[s]):
                    r_ok, w_ok = a.owns(s, i, j, rank, 3, w, 2)
                    if r_ok:
                        j += 1
                        if w_ok:
                            seen[(s, i)] += 1
    assert seen == Counter({(0, 0): 1, (1, 0): 1})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_same_batches_on_every_rank(tmp_path, num_workers):
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9), split="train")
    for world in (1, 2, 3):
        expected = batches_per_rank(16, 4, world)
        got = []
        for rank in range(world):
            dm = dm_for(None, 16, num_workers, train_shards=sh["spec"], shuffle_buffer=4)
            dm.set_distributed(rank, world)
            loader = dm.train_dataloader()
            assert len(loader) == expected
            n = 0
            for x, y in loader:
                assert x.shape == (4, 3, 32, 32) and y.shape == (4,)  # full batches only
                assert ((0 <= y) & (y < 16)).all()
                n += 1
            got.append(n)
            assert dm.sample_counts("train")["ok"] == 4 * expected
            # fixed epoch length: a second epoch (persistent workers) has the same length
            assert sum(1 for _ in loader) == expected
            _shutdown(loader)
        assert got == [expected] * world, (world, got)


def _shutdown(loader):
    """Stop persistent workers now (left to the garbage collector they cost a 5 s join timeout each)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def test_train_dataset_worker_quota_sums_to_epoch():
    ds = TrainShardDataset(["a.tar"], lambda im: im, batch_size=4, num_samples=37, rank=0, world_size=2)
    assert len(ds) == 5
    for nw in (1, 2, 3, 4, 7):
        assert sum(ds.worker_quota(w, nw) for w in range(nw)) == 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_and_unlabelled_samples_skipped_and_counted(tmp_path, caplog, num_workers):
    from data_helpers import jpg

    # garbage bytes as jpg (two kinds) and a sample without cls, inside the shards
    bad = {(0, 1): {"jpg": b"this is not a jpeg", "cls": 1}, (2, 5): {"jpg": b"\xff\xd8garbage", "cls": 12},
           (2, 3): {"jpg": jpg(10)}}
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9), extra=bad)
    dm = dm_for(sh["spec"], 16, num_workers)
    with caplog.at_level(logging.WARNING, logger="tokenprune.data"):
        labels, _ = collect(dm.val_dataloader())
    assert sorted(labels) == sh["labels"] and len(labels) == 13
    counts = dm.sample_counts("validation")
    assert counts["ok"] == 13
    assert counts["decode_error"] == 2 and counts["missing_label"] == 1 and counts["skipped"] == 3
    assert dm.skipped_counts("validation")["skipped"] == 3
    assert "ok" not in dm.skipped_counts("validation")
    if num_workers == 0:  # worker processes log outside caplog's reach
        assert "missing_label" in caplog.text and "decode_error" in caplog.text


def test_train_corrupt_samples_counted(tmp_path):
    from data_helpers import jpg

    sh = make_indexed_shards(tmp_path, sizes=(3, 3), split="train",
                             extra={(0, 0): {"jpg": b"junk", "cls": 0}, (1, 2): {"jpg": jpg(5)}})
    dm = dm_for(None, 16, 0, train_shards=sh["spec"], train_samples=40, shuffle_buffer=0)
    n = sum(y.numel() for _, y in dm.train_dataloader())
    c = dm.sample_counts("train")
    assert n == c["ok"] == 40
    assert c["decode_error"] >= 1 and c["missing_label"] >= 1 and c["skipped"] == c["decode_error"] + c["missing_label"]


def test_bad_label_and_missing_image_counted(tmp_path):
    from data_helpers import jpg

    sh = make_indexed_shards(tmp_path, sizes=(4,), extra={(0, 0): {"cls": 3}, (0, 1): {"jpg": jpg(1), "cls": 99}})
    dm = dm_for(sh["spec"], 16, 0)
    labels, _ = collect(dm.val_dataloader())
    assert sorted(labels) == [2, 3]
    c = dm.sample_counts("validation")
    assert c["missing_image"] == 1 and c["bad_label"] == 1 and c["ok"] == 2
    assert "jpg" in IMAGE_KEYS


def test_truncated_shard_counted_as_short_shard(tmp_path):
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9))
    data = open(sh["urls"][2], "rb").read()
    with open(sh["urls"][2], "wb") as f:  # cut inside the first member's data: read error, 9 samples lost
        f.write(data[:1000])
    dm = dm_for(sh["spec"], 16, 0)
    labels, _ = collect(dm.val_dataloader())
    c = dm.sample_counts("validation")
    assert c["ok"] == len(labels) == 7 and sorted(labels) == list(range(7))
    assert c["short_shard"] == 16 - len(labels) and c["read_error"] == 1


class _Recorder(L.LightningModule):
    def __init__(self, n_classes):
        super().__init__()
        self.head = torch.nn.Linear(3, n_classes)
        self.labels = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.labels += y.tolist()
        return None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_monitor_counts_full_validation_exactly(tmp_path, caplog, num_workers):
    """Regression: the baseline used to be taken at on_validation_epoch_start, after Lightning had
    prefetched the first batches, so data/validation_samples under-counted and a false
    'scored N but the split has M' warning fired."""
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9))
    dm = dm_for(sh["spec"], 16, num_workers)
    model = _Recorder(16)
    mon = SkippedSampleMonitor()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[mon])
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="tokenprune.data"):
        warnings.simplefilter("ignore")
        (res,) = trainer.validate(model, datamodule=dm)
        assert sorted(model.labels) == list(range(16))
        assert mon.last_counts["validation"]["ok"] == 16
        assert res["data/validation_samples"] == 16 and res["data/validation_skipped"] == 0
        assert "scored" not in caplog.text
        # a second pass counts only its own samples
        model.labels = []
        (res,) = trainer.validate(model, datamodule=dm)
    assert mon.last_counts["validation"]["ok"] == 16 and res["data/validation_samples"] == 16
    assert "scored" not in caplog.text


def test_monitor_warns_when_samples_missing(tmp_path, caplog):
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9), extra={(1, 0): {"jpg": b"junk", "cls": 5}})
    dm = dm_for(sh["spec"], 16, 0)
    mon = SkippedSampleMonitor()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[mon])
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="tokenprune.data"):
        warnings.simplefilter("ignore")
        (res,) = trainer.validate(_Recorder(16), datamodule=dm)
    assert res["data/validation_samples"] == 15 and res["data/validation_skipped"] == 1
    assert "scored 15 samples but the split has 16" in caplog.text
