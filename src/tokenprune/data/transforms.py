"""Image transforms and the mixup / loss choice for training.

Sizes, interpolation and mean/std come from the model's timm data config through the DataModule
(:meth:`ShardDataModule.use_model_data_config`); the defaults below are timm's ImageNet ones.

* eval: ``Resize(resize_size, bicubic)`` (shorter side) → ``CenterCrop(image_size)`` → tensor → normalise;
  the ViM/DeiT evaluation transform at 256/224. For the 56×56 digits images use 56/56, which is the
  identity apart from normalisation.
* train, ``augment="timm"``: ``timm.data.create_transform(is_training=True)`` as DeiT/ViM train it --
  RandomResizedCrop (bicubic), horizontal flip, RandAugment ``auto_augment``, random erasing
  (``re_prob``, pixel mode, one box).
* train, ``augment="none"``: the eval transform.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "TRAIN_AUGMENTS",
    "build_eval_transform",
    "build_train_transform",
    "build_mixup",
    "build_train_loss",
]

TRAIN_AUGMENTS = ("timm", "none")


def build_eval_transform(image_size: int = 224, resize_size: int = 256,
                         mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = IMAGENET_DEFAULT_STD, interpolation: str = "bicubic") -> Callable:
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
    return T.Compose([
        T.Resize(resize_size, interpolation=_interpolation(interpolation)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"interpolation must be one of {[m.value for m in InterpolationMode]}, "
                         f"got {name!r}") from None


def build_train_transform(image_size: int = 224, augment: str = "timm",
                          auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                          mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                          std: Sequence[float] = IMAGENET_DEFAULT_STD, resize_size: int | None = None,
                          interpolation: str = "bicubic") -> Callable:
    if augment not in TRAIN_AUGMENTS:
        raise ValueError(f"train_augment must be one of {TRAIN_AUGMENTS}, got {augment!r}")
    if augment == "none":
        return build_eval_transform(image_size, resize_size or image_size, mean, std, interpolation)
    return create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=0.4,
        auto_augment=auto_augment or None,
        interpolation=interpolation,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )


def build_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` (which also applies label smoothing to the mixed targets), or None if both alphas are 0."""
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
    if mixup == 0 and cutmix == 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                 num_classes=num_classes)


def build_train_loss(mixup_active: bool, label_smoothing: float) -> nn.Module:
    """SoftTargetCrossEntropy with mixup (the targets are already soft and smoothed), else
    LabelSmoothingCrossEntropy when smoothing > 0, else CrossEntropyLoss."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Undo the normalisation of a (…, 3, H, W) tensor (for looking at batches)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m
