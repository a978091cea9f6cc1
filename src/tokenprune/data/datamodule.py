"""``ShardDataModule``: ImageNet-style webdataset shards for Lightning (train / validate / test / predict).

Batches are ``(images, labels)`` -- float32 (B, 3, H, W) normalised images and int64 (B,) labels.
Mixup/CutMix is *not* applied in the loader: the LightningModule calls ``datamodule.mixup_fn(x, y)``
on the training batch when it is not None and uses ``datamodule.train_loss_fn()``.

Distributed behaviour (see :mod:`tokenprune.data.pipeline`): the rank and world size are read when a
dataloader is built -- from the attached Trainer, else from an initialised ``torch.distributed``
process group, else from ``RANK``/``WORLD_SIZE``, else (0, 1); :meth:`ShardDataModule.set_distributed`
overrides them (tests, custom launchers). Training: fixed ``ceil(train_samples / (world_size *
batch_size))`` batches per rank from resampled shards. Evaluation: every sample exactly once.

Skipped samples: counted per loader ("train", "validation", "test", "predict") in shared memory
(:class:`tokenprune.data.pipeline.SampleCounter`); read them with :meth:`ShardDataModule.skipped_counts`
/ :meth:`ShardDataModule.sample_counts`. Add the :class:`SkippedSampleMonitor` callback to log the per-epoch
counts summed over ranks (``data/<split>_skipped``, ``data/<split>_samples``) and warn on rank 0 --
including a warning when a full validation pass did not score exactly the expected number of samples.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from .pipeline import (
    COLUMNS,
    SAMPLE_SKIP_REASONS,
    SKIP_REASONS,
    EvalShardDataset,
    SampleCounter,
    TrainShardDataset,
    batches_per_rank,
)
from .shards import ShardSet, resolve_shards
from .transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    TRAIN_AUGMENTS,
    build_eval_transform,
    build_mixup,
    build_train_loss,
    build_train_transform,
)

log = logging.getLogger("tokenprune.data")

__all__ = ["ShardDataModule", "SkippedSampleMonitor", "dist_info"]

EVAL_SPLITS = ("validation", "test", "predict")


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


class ShardDataModule(L.LightningDataModule):
    """ImageNet-layout webdataset shards (``jpg``/``jpeg``/``png`` + ``cls``).

    Args:
        train_shards: shard spec of the training split (brace pattern, glob, directory, ``::``-joined;
            see :mod:`tokenprune.data.shards`). Needed for ``fit``.
        val_shards: shard spec of the validation split; used by validate/test/predict too.
        train_samples: samples in the training split (defines the epoch length); default: ``_info.json``.
        val_samples: samples in the validation split; only used to check that a full pass scored all of
            them; default: ``_info.json`` if present, else unchecked.
        image_size: crop size fed to the model.
        resize_size: eval resize (shorter side) before the center crop (256 for 224 ImageNet eval).
        mean, std: normalisation.
        interpolation: resize interpolation ("bicubic", "bilinear", ...).
        crop_pct: eval crop fraction; resize_size defaults to floor(image_size / crop_pct).
            These five default to None = what the model says: its timm data config
            (``timm.data.resolve_model_data_config``, given by :meth:`use_model_data_config`, which the
            LightningModule calls in its ``setup``); a value set here overrides the model's. Without a model
            config: 224 / 256, bicubic, ImageNet mean and std.
        batch_size: per-rank training batch size.
        val_batch_size: per-rank eval batch size (default: ``batch_size``).
        num_workers: DataLoader workers per rank (0 = load in the main process).
        shuffle_buffer: training shuffle buffer (raw samples per worker).
        train_augment: ``"timm"`` (RandAugment/RandomResizedCrop/erasing, DeiT recipe) or ``"none"``.
        auto_augment: timm auto-augment string (``None`` → colour jitter instead).
        re_prob: random-erasing probability.
        mixup, cutmix: alphas of timm ``Mixup`` (both 0 → no mixup, ``mixup_fn`` is None).
        label_smoothing: label smoothing (inside mixup, or in the loss without it).
        num_classes: labels must lie in ``[0, num_classes)``; others are skipped as ``bad_label``.
        seed: seed of the shard resampling / shuffle streams (mixed with rank, worker and epoch).
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        train_samples: int | None = None,
        val_samples: int | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 5000,
        train_augment: str = "timm",
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()  # the arguments are read from self.hparams
        self._check_args()
        self._given = {k: v for k, v in dict(image_size=image_size, resize_size=resize_size, mean=mean, std=std,
                                             interpolation=interpolation, crop_pct=crop_pct).items()
                       if v is not None}
        self.model_data_config: dict | None = None
        self._resolve()
        #: timm ``Mixup`` applied by the LightningModule to training batches, or None
        self.mixup_fn = build_mixup(mixup, cutmix, label_smoothing, num_classes)
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None
        self._dist_override: tuple[int, int] | None = None
        self._counters: dict[str, SampleCounter] = {}

    # read by the LightningModule, the evaluation grid and the resumable training loader
    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    @property
    def val_shards(self) -> str | None:
        return self.hparams.val_shards

    @property
    def val_batch_size(self) -> int:
        return self.hparams.val_batch_size or self.hparams.batch_size

    @property
    def seed(self) -> int:
        return self.hparams.seed

    # ------------------------------------------------------------------ config
    def _check_args(self) -> None:
        h = self.hparams
        problems = []
        for name in ("image_size", "resize_size", "batch_size", "num_classes"):
            if h[name] is not None and int(h[name]) <= 0:
                problems.append(f"{name} must be > 0, got {h[name]}")
        if h.crop_pct is not None and not 0.0 < h.crop_pct <= 1.0:
            problems.append(f"crop_pct must be in (0, 1], got {h.crop_pct}")
        if h.val_batch_size is not None and h.val_batch_size <= 0:
            problems.append(f"val_batch_size must be > 0, got {h.val_batch_size}")
        if h.resize_size is not None and h.image_size is not None and h.resize_size < h.image_size:
            problems.append(f"resize_size ({h.resize_size}) must be >= image_size ({h.image_size})")
        if h.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {h.num_workers}")
        if h.shuffle_buffer < 0:
            problems.append(f"shuffle_buffer must be >= 0, got {h.shuffle_buffer}")
        if h.train_augment not in TRAIN_AUGMENTS:
            problems.append(f"train_augment must be one of {TRAIN_AUGMENTS}, got {h.train_augment!r}")
        if not 0.0 <= h.re_prob <= 1.0:
            problems.append(f"re_prob must be in [0, 1], got {h.re_prob}")
        if not 0.0 <= h.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {h.label_smoothing}")
        if h.mixup < 0 or h.cutmix < 0:
            problems.append(f"mixup/cutmix alphas must be >= 0, got {h.mixup}/{h.cutmix}")
        if (h.mixup > 0 or h.cutmix > 0) and h.batch_size % 2:
            problems.append(f"timm Mixup needs an even batch_size, got {h.batch_size}")
        if (h.mean is not None and len(h.mean) != 3) or (h.std is not None and len(h.std) != 3):
            problems.append(f"mean and std need 3 values, got {h.mean} / {h.std}")
        for name in ("train_samples", "val_samples"):
            if h[name] is not None and h[name] <= 0:
                problems.append(f"{name} must be > 0 when given, got {h[name]}")
        if problems:
            raise ValueError("ShardDataModule: " + "; ".join(problems))

    def use_model_data_config(self, config: dict | None) -> None:
        """Take image size, crop, interpolation and mean/std from the model's timm data config
        (``timm.data.resolve_model_data_config(model)``); values given to the constructor still win."""
        self.model_data_config = dict(config) if config else None
        self._resolve()
        log.info("eval transform from %s: resize %s (%s) / crop %s, mean %s, std %s",
                 "the model's data config" if config else "defaults", self.resize_size, self.interpolation,
                 self.image_size, self.mean, self.std)

    def _resolve(self) -> None:
        """Effective transform settings: constructor values, else the model's data config, else timm's
        ImageNet defaults."""
        cfg = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
               "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, **(self.model_data_config or {})}
        given = self._given
        h, w = cfg["input_size"][-2:]
        if "image_size" not in given and h != w:
            raise ValueError(f"ShardDataModule: the model's input size {h}x{w} is not square; set image_size")
        self.image_size = int(given.get("image_size", h))
        self.crop_pct = float(given.get("crop_pct", cfg["crop_pct"]))
        self.resize_size = int(given.get("resize_size", math.floor(self.image_size / self.crop_pct)))
        if self.resize_size < self.image_size:
            raise ValueError(f"ShardDataModule: resize_size ({self.resize_size}) must be >= image_size "
                             f"({self.image_size})")
        self.interpolation = str(given.get("interpolation", cfg["interpolation"]))
        self.mean = tuple(float(v) for v in given.get("mean", cfg["mean"]))
        self.std = tuple(float(v) for v in given.get("std", cfg["std"]))

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Force the (rank, world_size) used for the next dataloaders (tests, custom launchers)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self._dist_override = (int(rank), int(world_size))

    def dist_info(self) -> tuple[int, int]:
        if self._dist_override is not None:
            return self._dist_override
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return dist_info()

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Resolve shard lists and sample counts (local files only; no network)."""
        if stage in (None, "fit"):
            if self.hparams.train_shards is None:
                raise ValueError("ShardDataModule: train_shards is needed to fit")
            self.train_set = resolve_shards(self.hparams.train_shards, "train", self.hparams.train_samples,
                                            arg_name="train_samples", count_required=True)
        if stage in (None, "fit", "validate", "test", "predict"):
            if self.val_shards is None:
                if stage in ("validate", "test", "predict"):
                    raise ValueError(f"ShardDataModule: val_shards is needed to {stage}")
            else:
                self.val_set = resolve_shards(self.val_shards, "validation", self.hparams.val_samples,
                                              arg_name="val_samples", count_required=False)
        for line in self.describe():
            log.info(line)

    def _ensure(self, which: str) -> ShardSet:
        if which == "train":
            if self.train_set is None:
                self.setup("fit")
            assert self.train_set is not None
            return self.train_set
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return self.val_set

    def describe(self) -> list[str]:
        lines = []
        rank, world = self.dist_info()
        if self.train_set is not None:
            h = self.hparams
            nb = batches_per_rank(self.train_set.num_samples or 1, h.batch_size, world)
            lines.append(f"train: {len(self.train_set)} shards, {self.train_set.num_samples} samples, "
                         f"{nb} batches of {h.batch_size} per rank x {world} ranks, augment={h.train_augment}, "
                         f"mixup={'on' if self.mixup_fn is not None else 'off'}")
        if self.val_set is not None:
            lines.append(f"validation: {len(self.val_set)} shards, "
                         f"{self.val_set.num_samples if self.val_set.num_samples is not None else 'unknown'} samples, "
                         f"batch {self.val_batch_size}, eval transform resize {self.resize_size} / crop {self.image_size}")
        return lines

    # ------------------------------------------------------------------ transforms / training helpers
    def train_transform(self):
        h = self.hparams
        return build_train_transform(self.image_size, h.train_augment, h.auto_augment, h.re_prob,
                                     self.mean, self.std, resize_size=self.resize_size,
                                     interpolation=self.interpolation)

    def eval_transform(self):
        return build_eval_transform(self.image_size, self.resize_size, self.mean, self.std,
                                    interpolation=self.interpolation)

    def train_loss_fn(self) -> torch.nn.Module:
        """Loss matching the targets the training batches will have after ``mixup_fn``."""
        return build_train_loss(self.mixup_fn is not None, self.hparams.label_smoothing)

    # ------------------------------------------------------------------ counters
    def counter(self, split: str) -> SampleCounter:
        if split not in self._counters:
            self._counters[split] = SampleCounter(max(1, self.hparams.num_workers), split)
        return self._counters[split]

    def sample_counts(self, split: str = "validation") -> dict[str, int]:
        """Delivered (``ok``) and skipped counts of this process's ``split`` loader, cumulative."""
        if split == "val":
            split = "validation"
        if split not in self._counters:
            return {c: 0 for c in COLUMNS} | {"skipped": 0}
        return self._counters[split].totals()

    def skipped_counts(self, split: str | None = None) -> dict[str, Any]:
        """Skipped samples per reason (and their sum, ``skipped``) of this process, cumulative.

        With ``split=None`` a dict of every loader made so far: ``{"train": {...}, "validation": {...}}``.
        Counts cover this rank only; :class:`SkippedSampleMonitor` sums them over ranks.
        """
        if split is None:
            return {s: self.skipped_counts(s) for s in self._counters}
        counts = self.sample_counts(split)
        return {k: v for k, v in counts.items() if k != "ok"}

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, rank: int, persistent: bool = False) -> DataLoader:
        kwargs: dict[str, Any] = {}
        num_workers = self.hparams.num_workers
        if num_workers > 0:
            # Lightning's worker seeding (as seed_everything(workers=True) installs it), given the rank
            # explicitly: python, numpy and torch reseeded per worker from (the loader's base seed, worker,
            # rank), so augmentations differ between ranks and are reproducible
            kwargs.update(persistent_workers=persistent, prefetch_factor=2,
                          worker_init_fn=functools.partial(pl_worker_init_function, rank=rank))
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        shards = self._ensure("train")
        rank, world = self.dist_info()
        h = self.hparams
        ds = TrainShardDataset(shards.urls, self.train_transform(), h.batch_size, shards.num_samples,
                               rank=rank, world_size=world, shuffle_buffer=h.shuffle_buffer, seed=h.seed,
                               num_classes=h.num_classes, counter=self.counter("train"))
        return self._loader(ds, rank, persistent=h.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        shards = self._ensure("validation")
        rank, world = self.dist_info()
        ds = EvalShardDataset(shards.urls, self.eval_transform(), self.val_batch_size, rank=rank,
                              world_size=world, num_classes=self.num_classes, counter=self.counter(split),
                              what=split, shard_lengths=shards.shard_lengths)
        if shards.num_samples is not None and shards.num_samples < world:
            # a rank without a batch never registers the logged metrics and Lightning's epoch-end sync hangs
            raise ValueError(f"{split}: the split has {shards.num_samples} samples for {world} ranks; every rank "
                             "needs at least one (a rank with no batch hangs the metric sync): use fewer devices")
        if shards.num_samples is None and len(shards.urls) < world:
            log.warning("%s: %d shards for %d ranks and an unknown sample count: make sure there are at least "
                        "%d samples, or a rank with no batch will hang the metric sync", split, len(shards.urls),
                        world, world)
        return self._loader(ds, rank)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")


class SkippedSampleMonitor(Callback):
    """Logs and warns about skipped samples at the end of every train/validation/test epoch.

    Logs ``data/<split>_skipped`` (samples), ``data/<split>_read_errors`` (shard reads abandoned) and
    ``data/<split>_samples`` (delivered), summed over ranks, this epoch only; warns on
    rank 0 with the per-reason breakdown when anything was skipped, and after a full validation/test pass
    (``limit_*_batches`` of 1.0, not the sanity check) warns when the number of scored samples differs from
    the known size of the split. Each epoch's counts are the change since the previous report of the same
    split (or since ``setup`` for the first one): the baseline is *not* taken at epoch start, because by
    then Lightning has already created the loader iterator and its workers (or the prefetching fetcher)
    have delivered the first batches. During training the counts are a snapshot, as (persistent) workers
    prefetch across the epoch boundary. Metrics are logged from rank 0 only (``rank_zero_only=True``);
    they are already summed over ranks.
    """

    def __init__(self, log_metrics: bool = True):
        self.log_metrics = log_metrics
        self._base: dict[str, torch.Tensor] = {}
        #: counts of the last finished epoch of each split, summed over ranks
        self.last_counts: dict[str, dict[str, int]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Baselines of every split, before any loader of this run is iterated."""
        self._base = {}
        dm = trainer.datamodule
        if isinstance(dm, ShardDataModule):
            for split in ("train",) + EVAL_SPLITS:
                self._base[split] = dm.counter(split).vector()

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, expected_full: bool) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ShardDataModule):
            return
        now = dm.counter(split).vector()
        delta = now - self._base.get(split, torch.zeros_like(now))
        self._base[split] = now  # the next epoch of this split counts from here
        if trainer.world_size > 1:
            delta = trainer.strategy.reduce(delta.to(pl_module.device), reduce_op="sum").cpu()
        counts = dict(zip(COLUMNS, (int(v) for v in delta.tolist())))
        skipped = sum(counts[r] for r in SAMPLE_SKIP_REASONS)
        self.last_counts[split] = counts | {"skipped": skipped}
        if self.log_metrics and split != "predict" and not trainer.sanity_checking:
            pl_module.log(f"data/{split}_skipped", float(skipped), rank_zero_only=True)
            pl_module.log(f"data/{split}_read_errors", float(counts["read_error"]), rank_zero_only=True)
            pl_module.log(f"data/{split}_samples", float(counts["ok"]), rank_zero_only=True)
        if trainer.is_global_zero:
            if skipped or counts["read_error"]:
                reasons = {r: counts[r] for r in SKIP_REASONS if counts[r]}
                log.warning("%s: skipped %d corrupt/missing sample(s) and abandoned %d shard read(s) this epoch "
                            "over all ranks: %s", split, skipped, counts["read_error"], reasons)
            expected = dm.val_set.num_samples if dm.val_set is not None else None
            if expected_full and expected is not None and counts["ok"] != expected and not trainer.sanity_checking:
                log.warning("%s: scored %d samples but the split has %d (%d skipped as corrupt)",
                            split, counts["ok"], expected, skipped)

    @staticmethod
    def _full(limit: Any) -> bool:
        return isinstance(limit, float) and limit == 1.0

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "train", expected_full=False)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "validation",
                     expected_full=self._full(trainer.limit_val_batches) and not trainer.sanity_checking)

    def on_test_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "test", expected_full=self._full(trainer.limit_test_batches))

    def on_predict_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "predict", expected_full=False)
