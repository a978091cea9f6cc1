"""Helper for tests/test_data_ddp.py: Lightning DDP (gloo, CPU) validation over webdataset shards.

Run as a script (never imported by pytest): ``python tests/ddp_val_script.py SPEC.json OUT.json``.
SPEC holds ``{"devices": 2, "cases": [{"name", "val_shards", "num_classes", "num_workers", "batch_size"}]}``.
Every case runs ``trainer.validate`` on a tiny LightningModule whose label is the sample id and whose
deterministic "classifier" reads the id back from the constant grey image (value 10 * id + 5) and is
wrong exactly for ids divisible by 3. Rank 0 writes, per case, the ids seen by each rank, the
torchmetrics accuracy, the metrics returned by ``validate`` and the batch count of every rank.
The module also logs a per-step loss with ``sync_dist=True`` (synchronised at epoch end), so ranks
with different numbers of batches are exercised the way a real LightningModule logs.
"""

from __future__ import annotations

import json
import sys

import torch


def main(spec_path: str, out_path: str) -> None:
    import lightning as L
    import torch.distributed as dist
    import torchmetrics

    from tokenprune.data import ShardDataModule, SkippedSampleMonitor

    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)

    class IdModule(L.LightningModule):
        def __init__(self, num_classes: int, log_step_loss: bool = True):
            super().__init__()
            self.log_step_loss = log_step_loss
            self.num_classes = num_classes
            self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
            self.ids: list[int] = []
            self.batches = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            grey = x.float().mean(dim=(1, 2, 3)) * 255.0
            est = torch.round((grey - 5.0) / 10.0).long().clamp(0, self.num_classes - 1)
            pred = torch.where(est % 3 == 0, (est + 1) % self.num_classes, est)
            return torch.nn.functional.one_hot(pred, self.num_classes).float() * 10.0

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.ids.extend(int(v) for v in y.tolist())
            self.batches += 1
            self.acc.update(logits, y)
            self.log("val_acc", self.acc, on_epoch=True)
            if self.log_step_loss:
                self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), sync_dist=True,
                         batch_size=len(y))

    trainer = L.Trainer(accelerator="cpu", devices=spec.get("devices", 2), strategy="ddp",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SkippedSampleMonitor()])
    results = []
    for case in spec["cases"]:
        dm = ShardDataModule(val_shards=case["val_shards"], num_classes=case["num_classes"], image_size=8,
                             resize_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                             batch_size=case["batch_size"], num_workers=case["num_workers"],
                             mixup=0.0, cutmix=0.0)
        model = IdModule(case["num_classes"], case.get("log_step_loss", True))
        metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
        per_rank: list = [None] * trainer.world_size
        dist.all_gather_object(per_rank, {"rank": trainer.global_rank, "ids": model.ids, "batches": model.batches,
                                          "counts": dm.sample_counts("validation")})
        monitor = next(c for c in trainer.callbacks if isinstance(c, SkippedSampleMonitor))
        results.append({"name": case["name"], "per_rank": per_rank,
                        "metrics": {k: float(v) for k, v in metrics.items()},
                        "monitor": monitor.last_counts.get("validation")})
    if trainer.global_rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world_size": trainer.world_size, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
