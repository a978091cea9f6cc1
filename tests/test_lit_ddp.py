"""DDP: `train.py validate` on 2 CPU processes (gloo, launched as a subprocess) gives the accuracy and loss of
a 1-process run: every validation sample counted once, metrics synchronised over ranks (uneven ranks: 33 vs
17 samples)."""
import csv
import os
import sys
import warnings

import lightning as L
import pytest
import torch

from tokenprune.lit import PruningClassifier
from tokenprune.data.resume import ResumableShardDataModule

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))  # helpers
from lit_helpers import make_shards, run_train, write_config  # noqa: E402  (tests/scripts)


pytestmark = pytest.mark.usefixtures("one_thread")


def last_row_with(path, key):
    rows = [r for r in csv.DictReader(open(path)) if r.get(key)]
    assert rows, f"{key} not in {path}"
    return rows[-1]


def test_ddp_validate_matches_single_process(tmp_path):
    import timm

    shards = make_shards(tmp_path / "shards", train_sizes=(8,), val_sizes=(20, 17, 13))
    torch.manual_seed(1)
    weights = tmp_path / "vim_test.pth"
    torch.save({"model": timm.create_model("vim_test_patch4_32").state_dict()}, weights)
    cfg = write_config(tmp_path / "cfg.yaml", shards, backbone="vim_test_patch4_32", method="top", keep=0.75,
                       num_workers=1, extra={"model": {"checkpoint_file": str(weights)}})
    proc = run_train(["validate", "-c", cfg, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--run_dir", tmp_path / "ddp"], timeout=300, cwd=tmp_path)
    out = proc.stderr + proc.stdout
    assert "MEMBER: 2/2" in out and "distributed_backend=gloo" in out
    (csv_path,) = (tmp_path / "ddp" / "logs").glob("version_*/metrics.csv")
    ddp = last_row_with(csv_path, "val/top1")

    # the same validation in this process, 1 rank
    model = PruningClassifier("vim_test_patch4_32", "top", 0.75, checkpoint_file=str(weights), num_classes=10)
    dm = ResumableShardDataModule(val_shards=shards["val_shards"], image_size=32, resize_size=32,
                                  val_batch_size=16, num_workers=0, num_classes=10, mixup=0, cutmix=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (single,) = trainer.validate(model, datamodule=dm)
    n = shards["val_samples"]
    assert float(ddp["val/top1"]) * n == pytest.approx(round(single["val/top1"] * n), abs=1e-3)
    assert float(ddp["val/top1"]) == pytest.approx(single["val/top1"], abs=1e-7)
    assert float(ddp["val/top5"]) == pytest.approx(single["val/top5"], abs=1e-7)
    assert float(ddp["val/loss"]) == pytest.approx(single["val/loss"], rel=1e-5)  # summation order only
    assert 0 < single["val/top5"] < 1


def test_ddp_fit_smoke(tmp_path):
    """2-process fit (gloo): the resumable training loader, EMA and KD under DDP; 2 batches per rank and
    epoch, so 4 steps cross an epoch boundary and a validation."""
    shards = make_shards(tmp_path / "shards", train_sizes=(16, 16), val_sizes=(6, 5))
    cfg = write_config(tmp_path / "cfg.yaml", shards, backbone="deit_test_patch4_32", method="evit", keep=0.5,
                       num_workers=1, extra={"model": {"ema_decay": 0.9, "distill": "logits"},
                                             "trainer": {"max_steps": 4, "max_epochs": 10}})
    run_train(["fit", "-c", cfg, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--run_dir", tmp_path / "r"],
              timeout=300, cwd=tmp_path)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 4 and ckpt["epoch"] >= 1
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
