"""timm registry entries for Vision Mamba: `import tokenprune` then `timm.create_model("vim_small_patch16_224")`."""
from __future__ import annotations

from typing import Optional

from timm.models import register_model

from .checkpoint import load_checkpoint_file
from .vim import VisionMamba, checkpoint_filter_fn

TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_with_checkpoint(cls, filter_fn, defaults: dict, pretrained: bool = False,
                          checkpoint_file: Optional[str] = None, use_ema: bool = False, **kwargs):
    """Build a model and load a local official-layout file; nothing is ever downloaded."""
    for key in TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if pretrained and not checkpoint_file:
        raise ValueError(f"{cls.__name__}: pretrained=True needs checkpoint_file=<path to the official .pth>; "
                         "weights are never downloaded at run time")
    model = cls(**{**defaults, **kwargs})
    if checkpoint_file:
        load_checkpoint_file(model, checkpoint_file, filter_fn, use_ema=use_ema)
    return model


def _vim(defaults, **kwargs):
    return build_with_checkpoint(VisionMamba, checkpoint_filter_fn, defaults, **kwargs)


@register_model
def vim_tiny_patch16_224(pretrained=False, **kwargs):
    return _vim(dict(embed_dim=192, depth=24), pretrained=pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained=False, **kwargs):
    return _vim(dict(embed_dim=384, depth=24), pretrained=pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained=False, **kwargs):
    return _vim(dict(embed_dim=768, depth=24), pretrained=pretrained, **kwargs)


@register_model
def vim_micro_patch4_56(pretrained=False, **kwargs):
    """CPU-sized ViM for the built-in 56x56 data (14x14 grid like ImageNet): same block and middle CLS."""
    return _vim(dict(img_size=56, patch_size=4, embed_dim=64, depth=8, num_classes=10), pretrained=pretrained,
                **kwargs)


@register_model
def vim_micro_patch8_56(pretrained=False, **kwargs):
    """The shipped CPU ViM (7x7 grid: 4x cheaper to train on 2 cores than the 14x14 patch-4 variant)."""
    return _vim(dict(img_size=56, patch_size=8, embed_dim=64, depth=8, num_classes=10), pretrained=pretrained,
                **kwargs)


@register_model
def vim_test_patch4_32(pretrained=False, **kwargs):
    """Tiny random ViM for unit tests (8x8 grid)."""
    return _vim(dict(img_size=32, patch_size=4, embed_dim=32, depth=4, d_state=4, num_classes=10),
                pretrained=pretrained, **kwargs)
