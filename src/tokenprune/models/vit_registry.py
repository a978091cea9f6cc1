"""Small DeiT-style ViTs for CPU runs and tests, in timm's registry (the full DeiTs come from timm itself)."""
from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .registry import build_with_checkpoint


def _deit(defaults, **kwargs):
    return build_with_checkpoint(VisionTransformer, checkpoint_filter_fn, defaults, **kwargs)


@register_model
def deit_micro_patch4_56(pretrained=False, **kwargs):
    """DeiT block design at CPU size for the built-in 56x56 data (14x14 grid like ImageNet)."""
    return _deit(dict(img_size=56, patch_size=4, embed_dim=96, depth=8, num_heads=3, num_classes=10),
                 pretrained=pretrained, **kwargs)


@register_model
def deit_micro_patch8_56(pretrained=False, **kwargs):
    """The shipped CPU DeiT (7x7 grid, same grid as ``vim_micro_patch8_56``)."""
    return _deit(dict(img_size=56, patch_size=8, embed_dim=96, depth=8, num_heads=3, num_classes=10),
                 pretrained=pretrained, **kwargs)


@register_model
def deit_test_patch4_32(pretrained=False, **kwargs):
    """Tiny random DeiT for unit tests (8x8 grid)."""
    return _deit(dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10),
                 pretrained=pretrained, **kwargs)
