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
re-seeded every step (``PruningClassifier``); the training data stream of each epoch is a function of
(data seed, epoch, rank) only and a mid-epoch resume skips the batches already trained on
(:class:`ResumableTrainLoader`).
"""
from __future__ import annotations

import functools
import glob
import logging
import os
import random
import signal
import sys
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn

from ..data import ShardDataModule
from .callbacks import FlopsCallback, RequeueAtStepBoundary, ThroughputCallback
from .module import PruningClassifier

log = logging.getLogger("tokenprune.lit")


# ---------------------------------------------------------------------------------------------- data stream
class _PrivateRNG:
    """The global generators (torch CPU, numpy, python) swapped for a private stream while active.

    The training data stream draws from it -- the DataLoader's base seed for its workers, or, with
    ``num_workers=0``, the shard sampling and augmentations themselves -- so the data of an epoch does not
    depend on what the model's training step drew before.
    """

    def __init__(self, seed: int, epoch: int, rank: int):
        ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank), 0xDA7A])
        s = [int(v) for v in ss.generate_state(3, dtype=np.uint64)]
        gen = torch.Generator()
        gen.manual_seed(s[0] & 0x7FFFFFFFFFFFFFFF)
        self.torch_state = gen.get_state()
        self.np_state = np.random.RandomState(s[1] & 0xFFFFFFFF).get_state()
        self.py_state = random.Random(s[2]).getstate()
        self._saved = None

    def __enter__(self):
        self._saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        torch.set_rng_state(self.torch_state)
        np.random.set_state(self.np_state)
        random.setstate(self.py_state)
        return self

    def __exit__(self, *exc):
        self.torch_state, self.np_state, self.py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
        t, n, p = self._saved
        torch.set_rng_state(t)
        np.random.set_state(n)
        random.setstate(p)
        self._saved = None
        return False


class _EpochIterator:
    def __init__(self, loader: "ResumableTrainLoader"):
        self.loader = loader
        self.inner = None
        self.rng: Optional[_PrivateRNG] = None

    def __iter__(self):
        return self

    def _start(self) -> None:
        epoch, skip = self.loader.position()
        self.epoch, self.skipped = epoch, skip
        self.rng = _PrivateRNG(self.loader.seed, epoch, self.loader.rank)
        dl = self.loader.factory()
        set_epoch = getattr(getattr(dl, "dataset", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        with self.rng:
            inner = iter(dl)
            for _ in range(skip):
                next(inner)
        if skip:
            log.info("resume: epoch %d of the training stream fast-forwarded by %d batches (rank %d)",
                     epoch, skip, self.loader.rank)
        self.inner = inner

    def __next__(self):
        if self.inner is None:
            self._start()
        assert self.rng is not None
        with self.rng:
            try:
                return next(self.inner)
            except StopIteration:
                self.inner = iter(())  # release the DataLoader iterator (and its workers)
                raise


class ResumableTrainLoader:
    """A training loader whose every epoch is reproducible and which resumes mid-epoch exactly.

    Each epoch gets a fresh loader from ``factory`` (so no state leaks between epochs: persistent workers,
    per-process iteration counters), iterated with the global generators swapped for a private stream
    seeded from (seed, epoch, rank) (:class:`_PrivateRNG`). The epoch and the number of batches Lightning
    has already run in it are read from the trainer when the first batch is requested; after a resume the
    first ``k`` batches are produced and dropped, so the stream continues where the interrupted run was
    (this costs the loading time of ``k`` batches). Without a trainer, epochs are counted by ``iter()``
    calls. ``len()`` is the full epoch length.
    """

    def __init__(self, factory: Callable[[], Iterable], seed: int, rank: int,
                 trainer_ref: Optional[Callable[[], Any]] = None):
        self.factory = factory
        self.seed, self.rank = int(seed), int(rank)
        self._trainer_ref = trainer_ref or (lambda: None)
        self._len = len(factory())
        self._iters = 0

    def __len__(self) -> int:
        return self._len

    def position(self) -> tuple:
        """(epoch, batches of it already trained on) for the iterator that starts now."""
        trainer = self._trainer_ref()
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            return int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        epoch = self._iters - 1
        return epoch, 0

    def __iter__(self):
        self._iters += 1
        return _EpochIterator(self)

    # Lightning's stateful-loader protocol: the position itself comes from the trainer's progress (Lightning
    # restores a stateful loader only when the loader is built after the checkpoint is loaded, which
    # `estimated_stepping_batches` in configure_optimizers prevents); the state records the stream's seed.
    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "len": self._len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("len") != self._len:
            log.warning("resume: the training stream changed (seed %s -> %s, %s -> %s batches per epoch); "
                        "the resumed run will not see the data the interrupted one would have seen",
                        state.get("seed"), self.seed, state.get("len"), self._len)


class ResumableShardDataModule(ShardDataModule):
    """:class:`tokenprune.data.ShardDataModule` (same arguments) whose training loader is a
    :class:`ResumableTrainLoader`: a fresh loader every epoch and exact mid-epoch resume."""

    def train_dataloader(self):
        rank, _ = self.dist_info()
        factory = functools.partial(ShardDataModule.train_dataloader, self)
        return ResumableTrainLoader(factory, seed=self.seed, rank=rank, trainer_ref=lambda: self.trainer)


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
