"""Callbacks that simulate failures in the subprocess runs of the Lightning tests (importable from configs)."""
from __future__ import annotations

import os
import signal
import sys

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """Kills the process abruptly (os._exit, like SIGKILL: no teardown, no final checkpoint) when batch
    ``step + 1`` starts, i.e. after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)


class SignalAtStep(Callback):
    """Sends ``signum`` (default SIGUSR1, SLURM's requeue signal) to this process in the middle of the training
    batch that starts at global step ``step`` (before its forward pass), as SLURM would at any moment."""

    def __init__(self, step: int, signum: int = int(signal.SIGUSR1)):
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalAtSetup(Callback):
    """Sends SIGUSR1 to this process in ``setup``, before Lightning installs its handlers: a requeue signal that
    SLURM sent early, while the ranks still start."""

    def setup(self, trainer, pl_module, stage):
        os.kill(os.getpid(), signal.SIGUSR1)


class SlowFirstRun(Callback):
    """Sleeps ``seconds`` after every training batch of a job's first run (SLURM_RESTART_COUNT unset or 0), so that
    a signal SLURM sends at a time of its choosing finds it still training; the weights are not affected."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            import time
            time.sleep(self.seconds)
