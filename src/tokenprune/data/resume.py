"""Exact resume of the training data stream: every epoch reproducible, a mid-epoch resume continues it.

The stream of an epoch is seeded by (data seed, epoch, rank) alone, not by the training step's draws, so with
the same data settings (shards, batch size, ranks, num_workers, shuffle buffer) it replays exactly: each epoch gets a fresh loader,
iterated with the global generators swapped for a private stream (:class:`_PrivateRNG`), and a resumed run
skips the batches the interrupted one already trained on (:class:`ResumableTrainLoader`). train.py's CLI
uses :class:`ResumableShardDataModule`.
"""
from __future__ import annotations

import functools
import logging
import random
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn

from .datamodule import ShardDataModule

log = logging.getLogger("tokenprune.data")


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
