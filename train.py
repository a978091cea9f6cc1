#!/usr/bin/env python
"""Fine-tune or evaluate a pruned backbone with LightningCLI (fit / validate / test).

    python train.py fit      -c configs/data/imagenet.yaml -c configs/trainer/gpu_1.yaml \
                             -c configs/experiment/finetune_vim_s_papr_ss_kd.yaml --run_dir runs/ft
    python train.py fit      -c <same configs> --run_dir runs/ft --ckpt_path last     # resume exactly
    python train.py validate -c configs/data/imagenet.yaml -c configs/trainer/gpu_1.yaml \
                             -c configs/model/vim_small.yaml -c configs/pruning/papr_ss.yaml

`python train.py fit --help` lists every option; see tokenprune/lit/cli.py and slurm/README.md.
"""
import os
import signal
import sys


class EarlyRequeueSignal:
    """Records SIGUSR1 until the requeue callback (tokenprune.lit.callbacks.RequeueAtStepBoundary) takes over.

    SLURM sends `--signal=SIGUSR1@N` up to a minute before N seconds are left, so a short or requeued job can get
    it while the ranks still import and set up, and its default action kills them. The callback finds this
    handler (by its `received` flag) and requeues at the first training step if the signal came early."""

    received = False

    def __call__(self, signum, frame):
        self.received = True


if __name__ == "__main__":
    if os.environ.get("SLURM_JOB_ID") and sys.argv[1:2] == ["fit"]:
        signal.signal(signal.SIGUSR1, EarlyRequeueSignal())
    from tokenprune.lit.cli import main

    main()
