"""``PruningClassifier``: an image classifier with token pruning in the loop, for fine-tuning and evaluation.

* the network is ``tokenprune.create_model(backbone, method, keep, ...)`` (a ``PrunedModel``), exposed as
  ``self.model``; weights come from ``checkpoint_file`` -- a MODEL argument, so ablation values given in the
  config are never replaced by a checkpoint's saved hyperparameters (``--ckpt_path`` is only for resuming);
* AdamW without weight decay on norms, biases, 1-d parameters, pos_embed / cls_token (and parameters
  flagged ``_no_weight_decay`` or named by the models' ``no_weight_decay()``: ViM's A_log, A_b_log, ...),
  cosine schedule with linear warm-up stepped every optimizer step;
* optional EMA of the weights (timm ``ModelEmaV3``; validation/test then use the EMA weights; the EMA is a
  sub-module so its state is part of every checkpoint and a resume is exact);
* optional knowledge distillation (``distill="logits"`` soft KL, ``"hard"`` DeiT's hard-label CE) from a frozen
  teacher: the UNPRUNED model with the starting weights, or another network (``distill_teacher``, e.g. a ConvNet
  as in DeiT); its weights are not stored in checkpoints (rebuilt from the files);
* mixup / loss from the data module (``mixup_fn``, ``train_loss_fn()``) when it has them;
* top-1 / top-5 with torchmetrics (synchronised over ranks: each sample counted once), validation loss as a
  sample-weighted mean;
* the random generators of the training step (drop-path, mixup, random evaluators) are re-seeded every batch
  from (seed, epoch, batch index, rank), so a resumed run draws exactly what an uninterrupted one draws.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
from typing import Any, Dict, List, Optional, Union

import lightning as L
import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..envpaths import expand_env
from ..models.checkpoint import torch_load_trusted, weights_fingerprint
from ..pruning import create_model
from ..pruning.checkpoint import is_lightning_checkpoint, load_backbone_from_lightning, official_checkpoint_kwargs
from ..pruning.stage import PrunedModel

log = logging.getLogger("tokenprune.lit")

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "register_tokens")
DISTILL_MODES = (None, "logits", "hard")


# ---------------------------------------------------------------------------------------------- schedule
class WarmupCosine:
    """LambdaLR factor: linear warm-up over ``warmup`` steps to the base lr, then cosine down to ``min_lr``
    at step ``total`` (and flat after it)."""

    def __init__(self, base_lr: float, min_lr: float, warmup: int, total: int):
        if total < 1:
            raise ValueError(f"the schedule needs at least one step, got total={total}")
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.warmup, self.total = int(warmup), int(total)

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base_lr if self.base_lr > 0 else 0.0


# ---------------------------------------------------------------------------------------------- seeding
def step_seeds(seed: int, epoch: int, batch_idx: int, rank: int) -> List[int]:
    """Three 63-bit seeds (torch, numpy, python) derived from (seed, epoch, batch index, rank)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(batch_idx), int(rank), 0x7E57])
    return [int(v) & 0x7FFFFFFFFFFFFFFF for v in ss.generate_state(3, dtype=np.uint64)]


def seed_step(seed: int, epoch: int, batch_idx: int, rank: int) -> None:
    """Seed torch (all devices), numpy's and python's global generators for one training batch."""
    s_torch, s_np, s_py = step_seeds(seed, epoch, batch_idx, rank)
    torch.manual_seed(s_torch)
    np.random.seed(s_np & 0xFFFFFFFF)
    random.seed(s_py)


# ---------------------------------------------------------------------------------------------- module
class PruningClassifier(L.LightningModule):
    """Classifier = backbone + token-pruning method, trained (fine-tuned) or evaluated with Lightning.

    Args:
        backbone: timm model name (``vim_small_patch16_224``, ``deit_small_patch16_224``, ``vim_micro_patch4_56``, ...).
        method: pruning method (``tokenprune.list_methods()``) or None for the unpruned backbone.
        keep: per-stage keep ratio of the non-protected tokens (1.0 = unpruned).
        layers: blocks after which to reduce (0-based; -1 = before the encoder) or a named schedule
            (embed, thirds, quarter, every); default: the method's schedule.
        smoothing: score-smoothing kernel size (PaPr+SS: 3 or 5); default: the method's.
        alignment: SSM hidden-state alignment (None, "mask", "gap"); "default" = the method's.
        method_options: further keyword arguments of ``create_model`` (evaluator, reducer, border,
            smoothing_kind, seed, metric, contextual, mode, prune_fraction, ...).
        proposal: PaPr proposal ConvNet (timm name), e.g. ``mobilenetv2_100``.
        proposal_checkpoint: local weights of the proposal ConvNet.
        checkpoint_file: starting weights: an official file (ViM/DeiT/PlainMamba layout, loaded strictly) or a
            Lightning ``.ckpt`` of an earlier run (its ``model.backbone.*`` weights). ``$VARS`` are expanded.
            Not for resuming (use ``fit --ckpt_path last``).
        checkpoint_use_ema: take the EMA weights of the checkpoint (``model_ema`` / ``ema.module.*``).
        model_kwargs: extra ``timm.create_model`` kwargs (``drop_path_rate``, ``img_size``, ...).
        lr: peak learning rate (absolute: scale it with the global batch yourself, e.g. 5e-4 * B / 512).
        weight_decay: AdamW weight decay (not applied to norms, biases, pos_embed, cls_token).
        warmup_epochs: linear warm-up length in epochs (converted to optimizer steps).
        warmup_steps: warm-up length in optimizer steps (overrides warmup_epochs).
        min_lr: final learning rate of the cosine.
        schedule_steps: length of the cosine in optimizer steps (default: ``trainer.estimated_stepping_batches``).
        ema_decay: EMA decay (e.g. 0.9998) or None for no EMA; with EMA, validation/test use the EMA weights.
        distill: None, "logits" (soft: tau^2 * KL of the tempered distributions) or "hard" (DeiT's hard
            distillation: cross-entropy with the teacher's argmax) from a frozen teacher.
        distill_alpha: weight of the KD term: loss = (1 - alpha) * task + alpha * KD.
        distill_tau: KD temperature (soft distillation).
        distill_teacher: the teacher's timm name (e.g. ``papr_convnet_micro``); default: the unpruned student
            with its starting weights.
        distill_teacher_checkpoint: the teacher's weights (official layout, loaded strictly); needed with
            ``distill_teacher``.
        num_classes: classifier classes (default: the backbone's; the CLI links it to ``data.num_classes``).
        rng_seed: base seed of the per-step generators (default: ``seed_everything``'s, else 0); a resumed run
            keeps the seed stored in its checkpoint.
        compile: "none" (eager), "compile" (torch.compile of the forward) or "cudagraph" (CUDA-graph replay of
            the inference forward: validation/test at a fixed batch); see ``tokenprune.pruning.capture``.
    """

    def __init__(
        self,
        backbone: str,
        method: Optional[str] = None,
        keep: float = 1.0,
        layers: Union[List[int], str, None] = None,
        smoothing: Optional[int] = None,
        alignment: Optional[str] = "default",
        method_options: Optional[Dict[str, Any]] = None,
        proposal: Optional[str] = None,
        proposal_checkpoint: Optional[str] = None,
        checkpoint_file: Optional[str] = None,
        checkpoint_use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5,
        warmup_steps: Optional[int] = None,
        min_lr: float = 1e-6,
        schedule_steps: Optional[int] = None,
        ema_decay: Optional[float] = None,
        distill: Optional[str] = None,
        distill_alpha: float = 0.5,
        distill_tau: float = 1.0,
        distill_teacher: Optional[str] = None,
        distill_teacher_checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        rng_seed: Optional[int] = None,
        compile: str = "none",
    ):
        super().__init__()
        self.save_hyperparameters()
        self._check_args()
        self.model: PrunedModel = self._build_model(
            backbone, method, keep, layers=layers, smoothing=smoothing, alignment=alignment,
            method_options=method_options, proposal=proposal, proposal_checkpoint=proposal_checkpoint,
            checkpoint_file=checkpoint_file, checkpoint_use_ema=checkpoint_use_ema, model_kwargs=model_kwargs,
            num_classes=num_classes, compile=compile)
        n_cls = int(self.model.num_classes)
        if num_classes is not None and n_cls != num_classes:
            raise ValueError(f"backbone {backbone!r} has {n_cls} classes but num_classes={num_classes}")
        self.num_classes = n_cls
        # the teacher: frozen, never trained
        self.teacher: Optional[nn.Module] = None
        if distill is not None:
            self.teacher = self._build_teacher(distill_teacher, distill_teacher_checkpoint, n_cls)
        self.ema = self._build_ema(ema_decay)
        self._build_metrics(n_cls)
        self.mixup_fn = None
        self.train_loss_fn: nn.Module = nn.CrossEntropyLoss()
        self.base_seed: Optional[int] = rng_seed

    # ------------------------------------------------------------------ construction steps
    @staticmethod
    def _timm_kwargs(model_kwargs: Optional[Dict[str, Any]], num_classes: Optional[int]) -> Dict[str, Any]:
        """``timm.create_model`` kwargs: model_kwargs plus the class count when one is given."""
        mk = dict(model_kwargs or {})
        if num_classes is not None:
            mk["num_classes"] = int(num_classes)
        return mk

    @staticmethod
    def _read_starting_weights(ckpt_path: Optional[str], backbone: str, use_ema: bool,
                               mk: Dict[str, Any]) -> Optional[dict]:
        """Open ``checkpoint_file``: a Lightning checkpoint is returned (its backbone is loaded once the model is
        built); an official-layout file becomes the timm kwargs that load it, added to ``mk``."""
        if ckpt_path is None:
            return None
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"model.checkpoint_file not found: {ckpt_path!r}")
        obj = torch_load_trusted(ckpt_path)
        if is_lightning_checkpoint(obj):
            return obj
        del obj
        clash = {"checkpoint_file", "pretrained", "pretrained_cfg_overlay"} & set(mk)
        if clash:
            raise ValueError(f"give the weights either as model.checkpoint_file or in model_kwargs "
                             f"({sorted(clash)}), not both")
        mk.update(official_checkpoint_kwargs(backbone, ckpt_path, use_ema))
        return None

    def _build_model(self, backbone: str, method: Optional[str], keep: float, *, layers, smoothing, alignment,
                     method_options, proposal, proposal_checkpoint, checkpoint_file, checkpoint_use_ema,
                     model_kwargs, num_classes, compile) -> PrunedModel:
        """The pruned network with its starting weights (official file through timm, or the backbone of a
        Lightning checkpoint loaded strictly after building)."""
        mk = self._timm_kwargs(model_kwargs, num_classes)
        ckpt_path = expand_env(checkpoint_file, "checkpoint_file")
        lightning_ckpt = self._read_starting_weights(ckpt_path, backbone, checkpoint_use_ema, mk)
        model = create_model(
            backbone, method, keep, layers=layers, smoothing=smoothing, alignment=alignment,
            proposal=proposal, proposal_checkpoint=expand_env(proposal_checkpoint, "proposal_checkpoint"),
            model_kwargs=mk, compile=compile, **dict(method_options or {}))
        if lightning_ckpt is not None:
            load_backbone_from_lightning(model, ckpt_path, checkpoint_use_ema, ckpt=lightning_ckpt)
        return model

    def _build_ema(self, ema_decay: Optional[float]):
        """timm ``ModelEmaV3`` of ``self.model`` (frozen), or None without ``ema_decay``."""
        if ema_decay is None:
            return None
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(self.model, decay=float(ema_decay))
        ema.requires_grad_(False)
        return ema

    def _build_metrics(self, n_cls: int) -> None:
        """top-1 / top-5 accuracy and the mean loss of validation and test."""
        top_k = min(5, n_cls)
        self.val_top1 = MulticlassAccuracy(n_cls, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(n_cls, top_k=top_k, average="micro")
        self.val_loss = MeanMetric()
        self.test_top1 = MulticlassAccuracy(n_cls, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(n_cls, top_k=top_k, average="micro")
        self.test_loss = MeanMetric()

    # ------------------------------------------------------------------ checks
    def _check_args(self) -> None:
        h = self.hparams
        problems = []
        if not 0.0 < h.keep <= 1.0:
            problems.append(f"keep must be in (0, 1], got {h.keep}")
        if h.distill not in DISTILL_MODES:
            problems.append(f"distill must be one of {DISTILL_MODES}, got {h.distill!r}")
        if (h.distill_teacher is None) != (h.distill_teacher_checkpoint is None):
            problems.append("give distill_teacher and distill_teacher_checkpoint together (a teacher must be "
                            f"trained), got {h.distill_teacher!r} and {h.distill_teacher_checkpoint!r}")
        if h.distill_teacher is not None and h.distill is None:
            problems.append(f"distill_teacher={h.distill_teacher!r} needs distill='logits' or 'hard'")
        if not 0.0 <= h.distill_alpha <= 1.0:
            problems.append(f"distill_alpha must be in [0, 1], got {h.distill_alpha}")
        if h.distill_tau <= 0:
            problems.append(f"distill_tau must be > 0, got {h.distill_tau}")
        if h.ema_decay is not None and not 0.0 < h.ema_decay < 1.0:
            problems.append(f"ema_decay must be in (0, 1) or null, got {h.ema_decay}")
        if h.lr <= 0 or h.min_lr < 0 or h.min_lr > h.lr:
            problems.append(f"need 0 <= min_lr <= lr and lr > 0, got lr={h.lr}, min_lr={h.min_lr}")
        if h.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {h.weight_decay}")
        if h.warmup_epochs < 0 or (h.warmup_steps is not None and h.warmup_steps < 0):
            problems.append(f"warm-up must be >= 0, got warmup_epochs={h.warmup_epochs}, warmup_steps={h.warmup_steps}")
        if h.schedule_steps is not None and h.schedule_steps < 1:
            problems.append(f"schedule_steps must be >= 1 when given, got {h.schedule_steps}")
        if h.num_classes is not None and h.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {h.num_classes}")
        if problems:
            raise ValueError("PruningClassifier: " + "; ".join(problems))

    def _build_teacher(self, name: Optional[str], checkpoint: Optional[str], n_cls: int) -> nn.Module:
        """The unpruned student with its starting weights, or the named network with its weights file."""
        if name is None:
            teacher: nn.Module = PrunedModel(copy.deepcopy(self.model.backbone), [], method=None)
        else:
            path = expand_env(checkpoint, "distill_teacher_checkpoint")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"model.distill_teacher_checkpoint not found: {path!r}")
            kwargs = official_checkpoint_kwargs(name, path)
            # built with the student's class count, so a mismatching file fails the strict load (naming the head)
            # instead of timm silently re-initialising a stock model's classifier
            kwargs["num_classes"] = n_cls
            if "pretrained_cfg_overlay" in kwargs:
                kwargs["pretrained_cfg_overlay"]["num_classes"] = n_cls
            teacher = timm.create_model(name, **kwargs)
            out = getattr(teacher, "num_classes", n_cls)
            if out != n_cls:
                raise ValueError(f"distill_teacher {name!r} has {out} classes, the student {n_cls}")
        return teacher.requires_grad_(False).eval()

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    @property
    def eval_model(self) -> nn.Module:
        """The network used for validation/test: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def data_config(self) -> dict:
        """The backbone's timm data config (input size, crop_pct, interpolation, mean/std)."""
        from ..models.timm_contract import model_data_config
        return model_data_config(self.model)

    def unpruned_model(self) -> PrunedModel:
        """The same backbone (shared weights) without reduction stages: the reference for speed-ups."""
        return PrunedModel(self.model.backbone, [], method=None).set_compile(self.model.compile_mode)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(dm, "use_model_data_config"):  # transforms as the model says (data config overrides win)
            dm.use_model_data_config(self.data_config())
        self.mixup_fn = getattr(dm, "mixup_fn", None)
        loss_fn = getattr(dm, "train_loss_fn", None)
        self.train_loss_fn = loss_fn() if callable(loss_fn) else nn.CrossEntropyLoss()
        if self.base_seed is None:
            self.base_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def configure_callbacks(self):
        try:
            from ..data import SkippedSampleMonitor
        except Exception:  # noqa: BLE001 - the data package is optional for this module
            return []
        return [SkippedSampleMonitor()]

    # ------------------------------------------------------------------ optimisation
    def _no_weight_decay_names(self) -> List[str]:
        """Parameter names of ``self.model`` kept out of weight decay besides the 1-d ones and biases: the models'
        own ``no_weight_decay()`` lists (ViM: A_log, A_b_log, ... as the recipes), the NO_DECAY_NAMES leaves
        (pos_embed, cls_token, ...) and parameters flagged ``_no_weight_decay``."""
        listed = set()
        for prefix, module in self.model.named_modules():
            if callable(getattr(module, "no_weight_decay", None)):
                listed |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
        return [name for name, p in self.model.named_parameters()
                if name in listed or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
                or getattr(p, "_no_weight_decay", False)]

    def parameter_groups(self) -> List[Dict[str, Any]]:
        """``[decay, no_decay]`` AdamW groups of the trainable parameters (in ``named_parameters`` order).

        The split is timm's ``param_groups_weight_decay`` (1-d parameters, biases and the listed names get no
        decay). Its groups are re-laid here because timm's layout differs where it matters for resuming:
        it puts the no-decay group first, leaves out empty groups and, with ``weight_decay=0``, returns a single
        group, while an optimizer's saved state is matched to its groups by position; so this always returns
        the two groups, decay first (timm is asked with a non-zero decay only to get the split). The listed names
        are timm's fnmatch patterns; parameter names hold no wildcards, so each matches itself only."""
        split = param_groups_weight_decay(self.model, weight_decay=1.0,
                                          no_weight_decay_list=self._no_weight_decay_names())
        by_decay = {bool(g["weight_decay"]): g["params"] for g in split}
        return [{"params": by_decay.get(True, []), "weight_decay": self.hparams.weight_decay},
                {"params": by_decay.get(False, []), "weight_decay": 0.0}]

    def _schedule_lengths(self) -> tuple:
        h = self.hparams
        total = h.schedule_steps
        if total is None:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("cannot size the cosine schedule: set trainer.max_epochs or trainer.max_steps, "
                                 "or model.schedule_steps")
        warmup = h.warmup_steps
        if warmup is None:
            warmup = 0
            if h.warmup_epochs > 0:
                n_batches = self.trainer.num_training_batches
                if not math.isfinite(n_batches):
                    self.trainer.fit_loop.setup_data()
                    n_batches = self.trainer.num_training_batches
                if not math.isfinite(n_batches):
                    raise ValueError("warmup_epochs needs a training loader with a length; give model.warmup_steps")
                per_epoch = math.ceil(n_batches / self.trainer.accumulate_grad_batches)
                warmup = int(round(h.warmup_epochs * per_epoch))
        return int(total), int(min(warmup, total))

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=h.lr, betas=(0.9, 0.999), eps=1e-8)
        total, warmup = self._schedule_lengths()
        self.schedule = WarmupCosine(h.lr, h.min_lr, warmup, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch, batch_idx):
        seed_step(self.base_seed or 0, self.current_epoch, batch_idx, self.global_rank)

    def distill_loss(self, student: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        with torch.no_grad():
            teacher = self.teacher(images)
        if self.hparams.distill == "hard":
            return F.cross_entropy(student, teacher.argmax(dim=-1))
        tau = self.hparams.distill_tau
        return F.kl_div(F.log_softmax(student.float() / tau, dim=-1), F.log_softmax(teacher.float() / tau, dim=-1),
                        reduction="batchmean", log_target=True) * tau * tau

    def training_step(self, batch, batch_idx):
        images, targets = batch
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        logits = self.model(images)
        task = self.train_loss_fn(logits, targets)
        loss = task
        bs = images.shape[0]
        if self.teacher is not None:
            kd = self.distill_loss(logits, images)
            a = self.hparams.distill_alpha
            loss = (1.0 - a) * task + a * kd
            self.log("train/task_loss", task, on_step=True, on_epoch=False, batch_size=bs)
            self.log("train/kd_loss", kd, on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=bs)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                     batch_size=bs)
        return loss

    def _eval_step(self, batch, top1, top5, mean_loss, prefix: str):
        images, targets = batch
        logits = self.eval_model(images)
        loss = F.cross_entropy(logits.float(), targets)
        top1.update(logits, targets)
        top5.update(logits, targets)
        mean_loss.update(loss, weight=targets.shape[0])
        bs = targets.shape[0]
        self.log(f"{prefix}/top1", top1, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log(f"{prefix}/top5", top5, on_step=False, on_epoch=True, batch_size=bs)
        self.log(f"{prefix}/loss", mean_loss, on_step=False, on_epoch=True, batch_size=bs)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_top1, self.val_top5, self.val_loss, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_top1, self.test_top5, self.test_loss, "test")

    def on_train_start(self) -> None:
        # resuming with another teacher would silently train towards other targets: refuse it
        if getattr(self, "_teacher_changed", None):
            raise RuntimeError(self._teacher_changed + ": restore that file or start a new run")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]  # rebuilt from checkpoint_file; no need to store a second copy of the backbone
        checkpoint["tokenprune"] = {"base_seed": self.base_seed}
        if self.teacher is not None:  # the teacher is not stored: remember which one it was
            checkpoint["tokenprune"]["teacher_sha256"] = weights_fingerprint(self.teacher)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict")
        if sd is not None and self.teacher is not None and not any(k.startswith("teacher.") for k in sd):
            sd.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        saved_teacher = checkpoint.get("tokenprune", {}).get("teacher_sha256")
        self._teacher_changed = None
        if saved_teacher is not None and self.teacher is not None:
            now = weights_fingerprint(self.teacher)
            if now != saved_teacher:
                where = self.hparams.get("distill_teacher_checkpoint") or self.hparams.get("checkpoint_file")
                self._teacher_changed = (f"the distillation teacher rebuilt from {where!r} is not the one this "
                                         f"checkpoint was trained with (weights sha256 {now[:12]}..., "
                                         f"saved {saved_teacher[:12]}...)")
                log.warning("%s; evaluating is fine, resuming training is refused", self._teacher_changed)
        saved = checkpoint.get("tokenprune", {}).get("base_seed")
        if saved is not None:
            if self.base_seed is not None and self.base_seed != saved:
                log.warning("resuming with the per-step seed %s of the checkpoint (this run was given %s)",
                            saved, self.base_seed)
            self.base_seed = saved
