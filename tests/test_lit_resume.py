"""Exact resume through train.py (subprocesses): a run killed mid-epoch and resumed with `--ckpt_path last`,
and a run requeued by SLURM's SIGUSR1 (simulated SLURM environment, fake scontrol) and resumed from its
hpc checkpoint, both end with the same weights, EMA, optimizer and LR-scheduler state as an uninterrupted run.

The runs use every source of randomness the pipeline has: a DataLoader worker with timm augmentations
(RandAugment, random erasing), resampled shards with a shuffle buffer, mixup/cutmix, drop-path, EMA and KD.
Epochs have 8 batches; the runs stop at step 12, so a resume crosses an epoch boundary and a validation.
"""
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))  # helpers
from lit_helpers import make_shards, run_train, write_config  # noqa: E402  (tests/scripts)

MAX_STEPS = 12


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict):
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["epoch"] == b["epoch"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert sorted(sa) == sorted(sb)
    assert any(k.startswith("ema.module.") for k in sa)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["tokenprune"] == b["tokenprune"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    shards = make_shards(root / "shards")
    cfg = write_config(
        root / "cfg.yaml", shards, backbone="deit_test_patch4_32", method="evit", keep=0.6, num_workers=1,
        extra={"model": {"ema_decay": 0.9, "distill": "logits", "model_kwargs": {"drop_path_rate": 0.1}},
               "data": {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "re_prob": 0.25},
               "trainer": {"max_steps": MAX_STEPS, "max_epochs": 10},
               "last_checkpoint": {"every_n_train_steps": 2}})
    run_train(["fit", "-c", cfg, "--run_dir", root / "uninterrupted"], cwd=root)
    reference = load(root / "uninterrupted" / "checkpoints" / "last.ckpt")
    return root, cfg, reference


def test_killed_run_resumes_exactly(setup):
    root, cfg, reference = setup
    run_dir = root / "killed"
    proc = run_train(["fit", "-c", cfg, "--run_dir", run_dir,
                      "--trainer.callbacks+=lit_test_callbacks.KillAtStep", "--trainer.callbacks.step", "6"],
                     cwd=root, check=False)
    assert proc.returncode == 17, proc.stderr[-3000:]  # killed (os._exit) at the start of step 7
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    proc = run_train(["fit", "-c", cfg, "--run_dir", run_dir, "--ckpt_path", "last"], cwd=root)
    assert "fast-forwarded by 6 batches" in proc.stderr
    assert_same_training_state(reference, load(run_dir / "checkpoints" / "last.ckpt"))


def test_last_checkpoint_is_written_at_every_epoch_end(setup):
    """Without step-level saves, a run killed in its second epoch resumes from the end of the first."""
    root, cfg, _ = setup
    run_dir = root / "epoch_end"
    proc = run_train(["fit", "-c", cfg, "--run_dir", run_dir, "--last_checkpoint.every_n_train_steps", "null",
                      "--trainer.callbacks+=lit_test_callbacks.KillAtStep", "--trainer.callbacks.step", "10"],
                     cwd=root, check=False)
    assert proc.returncode == 17, proc.stderr[-3000:]
    last = load(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 8 and last["epoch"] == 0  # the end of epoch 0 (8 batches), after validation


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NAME": "tokenprune-train", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def fake_scontrol(bin_dir: Path, log: Path) -> dict:
    """SLURM_ENV plus a PATH whose `scontrol` only appends its arguments to `log` (what requeue calls)."""
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$FAKE_SCONTROL_LOG"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return {**SLURM_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SCONTROL_LOG": str(log)}


def test_slurm_requeue_resumes_exactly(setup):
    root, cfg, reference = setup
    run_dir = root / "requeued"
    env = fake_scontrol(root / "bin", root / "scontrol.log")
    # SIGUSR1 arrives at the start of step 6 (mid-step); the checkpoint is written at the end of that step
    proc = run_train(["fit", "-c", cfg, "--run_dir", run_dir, "--last_checkpoint.every_n_train_steps", "4",
                      "--trainer.callbacks+=lit_test_callbacks.SignalAtStep", "--trainer.callbacks.step", "5"],
                     cwd=root, env_extra=env)
    out = proc.stderr + proc.stdout
    assert "SLURM auto-requeueing enabled" in out
    assert "saving the requeue checkpoint at step 6" in out
    assert (root / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = load(run_dir / "hpc_ckpt_1.ckpt")
    assert hpc["global_step"] == 6
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4  # older than the hpc checkpoint
    # the requeued job: same command, with --ckpt_path last (as slurm/train.sbatch adds it)
    proc = run_train(["fit", "-c", cfg, "--run_dir", run_dir, "--last_checkpoint.every_n_train_steps", "4",
                      "--ckpt_path", "last"], cwd=root, env_extra=env)
    assert f"resuming from {Path(run_dir) / 'hpc_ckpt_1.ckpt'}" in proc.stderr
    assert_same_training_state(reference, load(run_dir / "checkpoints" / "last.ckpt"))


def test_slurm_requeue_signal_during_start_up(setup):
    """SLURM may send the signal before the ranks have set up (up to a minute before `--signal=SIGUSR1@N`): train.py
    holds it and the job is requeued at the first step boundary instead of being killed by SIGUSR1."""
    root, cfg, _ = setup
    run_dir = root / "early"
    env = fake_scontrol(root / "bin_early", root / "scontrol_early.log")
    proc = run_train(["fit", "-c", cfg, "--run_dir", run_dir, "--trainer.callbacks+=lit_test_callbacks.SignalAtSetup"],
                     cwd=root, env_extra=env)
    assert "requeue signal received during start-up" in proc.stderr
    assert (root / "scontrol_early.log").read_text().split() == ["requeue", "4242"]
    assert load(run_dir / "hpc_ckpt_1.ckpt")["global_step"] == 1
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # the run ended at the requeue


def test_resumed_run_is_a_valid_starting_point(setup, tmp_path):
    """The last.ckpt of a run is also a `model.checkpoint_file` for a new experiment (EMA weights)."""
    from tokenprune.lit import PruningClassifier

    root, _, reference = setup
    m = PruningClassifier("deit_test_patch4_32", "evit", 0.5, checkpoint_use_ema=True,
                          checkpoint_file=str(root / "uninterrupted" / "checkpoints" / "last.ckpt"))
    ema = {k[len("ema.module.backbone."):]: v for k, v in reference["state_dict"].items()
           if k.startswith("ema.module.backbone.")}
    for k, v in m.model.backbone.state_dict().items():
        assert torch.equal(v, ema[k]), k
