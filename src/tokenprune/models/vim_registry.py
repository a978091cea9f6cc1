"""timm registry entries for Vision Mamba: `import tokenprune` then `timm.create_model("vim_small_patch16_224")`.

Entry points go through timm's build_model_with_cfg with a pretrained cfg per model (registry.py):
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))` or
`timm.create_model(name, checkpoint_file=PATH)` load an official file strictly; nothing is downloaded.
The blocks are fx leaves (register_notrace_module): the selective scan is an autograd Function whose shape
checks and kernel dispatch are Python, which symbolic tracing cannot follow.
"""
from __future__ import annotations

from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model

from .checkpoint import read_state_dict
from .registry import build_backbone, official_cfg, quarter_indices
from .vim import VimBlock, VisionMamba, checkpoint_filter_fn

register_notrace_module(VimBlock)

VIM_PAPER = dict(origin_url="https://github.com/hustvl/Vim", license="apache-2.0",
                 paper_name="Vision Mamba: Efficient Visual Representation Learning with Bidirectional State "
                            "Space Model", paper_ids="arXiv:2401.09417", first_conv="patch_embed.proj")


def _official(size: str, file: str) -> dict:
    return official_cfg(official_file=file, weights_url=f"https://huggingface.co/hustvl/Vim-{size}-midclstok",
                        **VIM_PAPER)


def _cpu(img_size: int) -> dict:
    """Our CPU-sized variants: 10 classes, no resize margin (the built-in data is drawn at this size)."""
    return official_cfg(official_file=None, weights_url=None, num_classes=10, input_size=(3, img_size, img_size),
                        crop_pct=1.0, **VIM_PAPER)


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224": _official("tiny", "vim_t_midclstok_76p1acc.pth"),
    "vim_small_patch16_224": _official("small", "vim_s_midclstok_80p5acc.pth"),
    "vim_base_patch16_224": _official("base", "vim_b_midclstok_81p9acc.pth"),
    "vim_micro_patch4_56": _cpu(56),
    "vim_micro_patch8_56": _cpu(56),
    "vim_test_patch4_32": _cpu(32),
})


def read_official(path: str, use_ema: bool):
    """An official ViM file (weights under `model`, EMA under `model_ema`) -> (state dict, filter)."""
    return read_state_dict(path, use_ema=use_ema), checkpoint_filter_fn


def _vim(variant: str, defaults: dict, pretrained: bool = False, **kwargs):
    """VisionMamba through timm's build_model_with_cfg (see timm_contract: local weights only)."""
    return build_backbone(VisionMamba, variant, pretrained, {**defaults, **kwargs}, filter_fn=checkpoint_filter_fn,
                          read_fn=read_official, out_indices=quarter_indices(defaults["depth"]))


@register_model
def vim_tiny_patch16_224(pretrained=False, **kwargs):
    return _vim("vim_tiny_patch16_224", dict(embed_dim=192, depth=24), pretrained=pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained=False, **kwargs):
    return _vim("vim_small_patch16_224", dict(embed_dim=384, depth=24), pretrained=pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained=False, **kwargs):
    return _vim("vim_base_patch16_224", dict(embed_dim=768, depth=24), pretrained=pretrained, **kwargs)


@register_model
def vim_micro_patch4_56(pretrained=False, **kwargs):
    """CPU-sized ViM for the built-in 56x56 data (14x14 grid like ImageNet): same block and middle CLS."""
    return _vim("vim_micro_patch4_56", dict(img_size=56, patch_size=4, embed_dim=64, depth=8, num_classes=10),
                pretrained=pretrained, **kwargs)


@register_model
def vim_micro_patch8_56(pretrained=False, **kwargs):
    """The shipped CPU ViM (7x7 grid: 4x cheaper to train on 2 cores than the 14x14 patch-4 variant)."""
    return _vim("vim_micro_patch8_56", dict(img_size=56, patch_size=8, embed_dim=64, depth=8, num_classes=10),
                pretrained=pretrained, **kwargs)


@register_model
def vim_test_patch4_32(pretrained=False, **kwargs):
    """Tiny random ViM for unit tests (8x8 grid)."""
    return _vim("vim_test_patch4_32", dict(img_size=32, patch_size=4, embed_dim=32, depth=4, d_state=4,
                                           num_classes=10), pretrained=pretrained, **kwargs)
