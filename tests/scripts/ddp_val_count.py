"""Lightning ``Trainer.validate`` over ShardDataModule shards, recording every (sample label, prediction) seen.

Run as a subprocess (``tests/test_data_ddp.py``): ``python ddp_val_count.py SPEC NUM_CLASSES OUT.json
--devices 2 --num_workers 2``. Every rank records the labels of the samples it scored (labels are unique
sample ids in the test shards); they are gathered with ``all_gather_object`` and rank 0 writes
``{"pairs": [[label, pred], ...], "world_size": ..., "per_rank": [...], "monitor": {...}}``.
"""
from __future__ import annotations

import argparse
import json
import warnings

import lightning as L
import torch

from tokenprune.data import ShardDataModule, SkippedSampleMonitor


class Recorder(L.LightningModule):
    """A fixed random linear head on the mean colour: deterministic predictions, some right, some wrong."""

    def __init__(self, num_classes: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.head = torch.nn.Linear(3, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, 3, generator=g) * 3)
            self.head.bias.copy_(torch.randn(num_classes, generator=g))
        self.pairs: list[list[int]] = []
        self.gathered: list[list[list[int]]] | None = None

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))

    def on_validation_epoch_start(self):
        self.pairs = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x).argmax(1)
        self.pairs += [[int(a), int(b)] for a, b in zip(y.tolist(), pred.tolist())]
        self.log("val/acc", (pred == y).float().mean(), batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            out = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(out, self.pairs)
            self.gathered = out
        else:
            self.gathered = [self.pairs]


def make_dm(spec: str, num_classes: int, num_workers: int, batch: int) -> ShardDataModule:
    return ShardDataModule(val_shards=spec, image_size=32, resize_size=32, val_batch_size=batch,
                           num_workers=num_workers, num_classes=num_classes, mixup=0.0, cutmix=0.0,
                           train_augment="none")


def run(spec: str, num_classes: int, devices: int, num_workers: int, batch: int, strategy: str) -> dict:
    model = Recorder(num_classes)
    mon = SkippedSampleMonitor()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[mon])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = trainer.validate(model, datamodule=make_dm(spec, num_classes, num_workers, batch))
    pairs = [p for rank_pairs in model.gathered for p in rank_pairs]
    return {"pairs": pairs, "per_rank": [len(r) for r in model.gathered], "world_size": trainer.world_size,
            "global_rank": trainer.global_rank, "metrics": {k: float(v) for k, v in metrics.items()},
            "monitor": mon.last_counts.get("validation", {})}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("num_classes", type=int)
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    res = run(a.spec, a.num_classes, a.devices, a.num_workers, a.batch, "ddp" if a.devices > 1 else "auto")
    if res["global_rank"] == 0:
        with open(a.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
