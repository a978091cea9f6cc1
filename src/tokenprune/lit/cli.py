"""LightningCLI glue for ``train.py``: subcommands, run directory, checkpoints, loggers, SLURM, exact resume.

Usage (see ``slurm/README.md`` for clusters)::

    python train.py fit      -c configs/data/imagenet.yaml -c configs/trainer/gpu_1.yaml \\
                             -c configs/experiment/finetune_vim_s_papr_ss_kd.yaml --run_dir runs/ft_papr_ss
    python train.py fit      -c ... --run_dir runs/ft_papr_ss --ckpt_path last      # resume, exactly
    python train.py validate -c configs/data/imagenet.yaml -c configs/trainer/gpu_1.yaml \\
                             -c configs/model/vim_small.yaml -c configs/pruning/papr_ss.yaml --model.keep 0.7

Run directory (``--run_dir``; default ``trainer.default_root_dir`` if set, else
``runs/<backbone>-<method>-keep<keep>``) -- stable across restarts and SLURM requeues::

    <run_dir>/checkpoints/last.ckpt, best-*.ckpt   ModelCheckpoint (save_last=True); latest-*.ckpt: the copy
                                                    Lightning needs before it rewrites last.ckpt
    <run_dir>/hpc_ckpt_<n>.ckpt                     SLURM requeue checkpoints (Lightning)
    <run_dir>/logs/version_<k>/                     one per start: metrics.csv, hparams.yaml, config.yaml
                                                    (the resolved config), flops.json, throughput.json

``--ckpt_path last`` resumes from the newest of ``checkpoints/last*.ckpt`` and ``hpc_ckpt_*.ckpt`` (starts
from scratch, with a message, when there is none). The checkpoint's saved hyperparameters never replace
the config (LightningCLI would do that for an explicit ``--ckpt_path FILE``; it is switched off here), so an
ablation given on the command line always wins; starting weights are ``--model.checkpoint_file``.

Exact resume: the model/optimizer/scheduler/EMA state is in the checkpoint; the training generators are
re-seeded every step (``PruningClassifier``); the training data stream of each epoch is seeded by (data seed,
epoch, rank) alone, not by the training step's draws, so with the same data settings (shards, batch size,
ranks, num_workers, shuffle buffer) it replays exactly, and a mid-epoch resume skips the batches already
trained on (:class:`tokenprune.data.resume.ResumableTrainLoader`).
"""
from __future__ import annotations

import glob
import logging
import os
import signal
import sys
from typing import Optional

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment

from ..data.resume import ResumableShardDataModule
from .callbacks import FlopsCallback, RequeueAtStepBoundary, ThroughputCallback
from .module import PruningClassifier

log = logging.getLogger("tokenprune.lit")


# ---------------------------------------------------------------------------------------------- run dir / resume
def default_run_name(model_cfg) -> str:
    method = model_cfg.get("method") or "dense"
    keep = model_cfg.get("keep", 1.0)
    return f"{model_cfg.get('backbone')}-{method}-keep{keep:g}"


def find_resume_checkpoint(run_dir: str, checkpoint_dir: Optional[str] = None) -> Optional[str]:
    """Newest of ``<checkpoint_dir>/last*.ckpt`` and ``<run_dir>/hpc_ckpt_*.ckpt``, or None."""
    checkpoint_dir = checkpoint_dir or os.path.join(run_dir, "checkpoints")
    found = glob.glob(os.path.join(checkpoint_dir, "last*.ckpt")) + glob.glob(os.path.join(run_dir, "hpc_ckpt_*.ckpt"))
    found = [p for p in found if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---------------------------------------------------------------------------------------------- CLI
class TokenPruneCLI(LightningCLI):
    """LightningCLI(PruningClassifier, ResumableShardDataModule) with fit / validate / test only, a stable run
    directory, CSV logging, ModelCheckpoint(save_last=True), FLOPs / throughput callbacks, SLURM auto-requeue
    and ``--ckpt_path last`` resolution (see the module docstring)."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(PruningClassifier, ResumableShardDataModule, args=args, run=run, **kwargs)

    @staticmethod
    def subcommands():
        base = LightningCLI.subcommands()
        return {k: base[k] for k in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="stable run directory (checkpoints/, logs/, hpc_ckpt_*.ckpt); default: "
                                 "trainer.default_root_dir, else runs/<backbone>-<method>-keep<keep>")
        # two checkpoint callbacks: the best model by val/top1 (at validation), and last.ckpt for resuming
        # (ModelCheckpoint defers step-level saves while its monitored metric is missing, so `last` must
        # not monitor anything to be saved every `every_n_train_steps`; and at an epoch's end it writes
        # last.ckpt only after a top-k save of its own, so it keeps one `latest-*` file: with save_top_k=0
        # an interrupted run lost every epoch since the best one)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.save_last": False,
            "checkpoint.monitor": "val/top1",
            "checkpoint.mode": "max",
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-epoch{epoch:03d}-step{step:07d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "last_checkpoint.save_last": True,
            "last_checkpoint.save_top_k": 1,
            "last_checkpoint.monitor": None,
            "last_checkpoint.filename": "latest-epoch{epoch:03d}-step{step:07d}",
            "last_checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(FlopsCallback, "flops")
        parser.add_lightning_class_args(ThroughputCallback, "throughput")
        parser.add_lightning_class_args(RequeueAtStepBoundary, "requeue")
        parser.link_arguments("data.num_classes", "model.num_classes")

    def _parse_ckpt_path(self) -> None:
        """Disabled: LightningCLI would replace the model config by the hyperparameters saved in the
        checkpoint given as ``--ckpt_path``; here the config (and so every ablation value) always wins."""

    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        run_dir = cfg.get("run_dir") or cfg.trainer.get("default_root_dir") or os.path.join(
            "runs", default_run_name(cfg.model))
        cfg.run_dir = run_dir
        root = cfg.trainer.get("default_root_dir")
        if root is not None and os.path.abspath(root) != os.path.abspath(run_dir):
            log.warning("trainer.default_root_dir=%s replaced by run_dir=%s (SLURM requeue checkpoints go there)",
                        root, run_dir)
        cfg.trainer.default_root_dir = run_dir
        for key in ("checkpoint", "last_checkpoint"):
            if cfg[key].get("dirpath") is None:
                cfg[key].dirpath = os.path.join(run_dir, "checkpoints")
        logger = cfg.trainer.get("logger")
        if logger is None or logger is True:
            cfg.trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                           init_args=Namespace(save_dir=run_dir, name="logs"))
        self.run_dir = run_dir

    def instantiate_trainer(self, **kwargs):
        if SLURMEnvironment.detect():
            plugins = _as_list(self._get(self.config_init, "trainer").get("plugins"))
            if not any(isinstance(p, ClusterEnvironment) for p in plugins):
                plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
            kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def _resolve_ckpt_path(self) -> None:
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") != "last":
            return
        path = find_resume_checkpoint(self.run_dir, self._cfg().last_checkpoint.get("dirpath"))
        if path is None:
            log.warning("--ckpt_path last: no last*.ckpt or hpc_ckpt_*.ckpt in %s; starting from scratch", self.run_dir)
        else:
            log.info("--ckpt_path last: resuming from %s", path)
        cfg.ckpt_path = path

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()


def _configure_logging() -> None:
    logger = logging.getLogger("tokenprune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(args=None) -> TokenPruneCLI:
    _configure_logging()
    return TokenPruneCLI(args=args)
