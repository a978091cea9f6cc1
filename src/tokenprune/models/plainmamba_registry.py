"""timm registry entries for PlainMamba: `import tokenprune` then `timm.create_model("plainmamba_l3")`.

Official mmcls files (`{"state_dict": {"backbone.*", "head.fc.*", ...}, "meta": ...}`) load strictly with
`checkpoint_file=<path>` or timm's `pretrained=True, pretrained_cfg_overlay=dict(file=<path>)` (one path:
timm_contract.py); `use_ema=True` picks the EMA weights, either the official EMA hook's `ema_*`
buffers inside `state_dict` or a separate `state_dict_ema` / `model_ema` entry. Nothing is downloaded.
"""
from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model

from .checkpoint import EMA_KEYS, CheckpointMismatchError, read_state_dict
from .plainmamba import ConvPatchEmbed, PlainMamba, PlainMambaLayer, checkpoint_filter_fn
from .registry import build_backbone, official_cfg, quarter_indices

# fx leaves: the scan is a Python-dispatched autograd Function, and the stem pads by Python arithmetic on
# the input size; symbolic tracing follows neither
register_notrace_module(PlainMambaLayer)
register_notrace_module(ConvPatchEmbed)

# The official arch_zoo (mmcls backbone `arch="L1" | "L2" | "L3"`).
ARCHS = {
    "L1": dict(embed_dim=192, depth=24, num_convs_patch_embed=1, layers_with_dwconv=(0,)),
    "L2": dict(embed_dim=384, depth=24, num_convs_patch_embed=2, layers_with_dwconv=()),
    "L3": dict(embed_dim=448, depth=36, num_convs_patch_embed=2, layers_with_dwconv=()),
}
# drop_path_rate of the official ImageNet recipes (plain_mamba_l{1,2,3}_in1k_300e.py), for fine-tuning.
OFFICIAL_DROP_PATH = {"L1": 0.2, "L2": 0.2, "L3": 0.4}


PM_PAPER = dict(origin_url="https://github.com/ChenhongyiYang/PlainMamba",
                paper_name="PlainMamba: Improving Non-Hierarchical Mamba in Visual Recognition",
                paper_ids="arXiv:2403.17695", first_conv="patch_embed.stem.0", pool_size=(14, 14))
HUB = "https://huggingface.co/ChenhongyiYang/PlainMamba/resolve/main/"


def _cpu(img_size: int, grid: int) -> dict:
    """Our CPU-sized variants: 10 classes, no resize margin (the built-in data is drawn at this size)."""
    return official_cfg(official_file=None, weights_url=None, num_classes=10, input_size=(3, img_size, img_size),
                        crop_pct=1.0, **{**PM_PAPER, "pool_size": (grid, grid)})


# eval transform of the official recipe (imagenet_bs64_swin_224): resize 256 bicubic, center crop 224
default_cfgs = generate_default_cfgs({
    "plainmamba_l1": official_cfg(official_file="l1.pth", weights_url=HUB + "l1.pth", **PM_PAPER),
    "plainmamba_l2": official_cfg(official_file="l2.pth", weights_url=HUB + "l2.pth", **PM_PAPER),
    "plainmamba_l3": official_cfg(official_file="l3.pth", weights_url=HUB + "l3.pth", **PM_PAPER),
    "plainmamba_micro_patch4_56": _cpu(56, 14),
    "plainmamba_test_32": _cpu(32, 8),
})


def read_official(path: str, use_ema: bool):
    """An official mmcls file -> (state dict, filter). EMA: the official EMA hook's `ema_*` buffers inside
    `state_dict`, else a separate `state_dict_ema` / `model_ema` entry."""
    if not use_ema:
        return read_state_dict(path), checkpoint_filter_fn
    flat = read_state_dict(path, use_ema=False)
    if any(k.startswith("ema_") for k in flat):
        def ema_filter(state_dict, model=None):
            try:
                return checkpoint_filter_fn(state_dict, model, use_ema_buffers=True)
            except KeyError as err:
                raise CheckpointMismatchError(f"{path}: {err.args[0]}") from None
        return flat, ema_filter
    if not set(_top_level_keys(path)) & set(EMA_KEYS):
        raise CheckpointMismatchError(f"{path}: use_ema=True but the file has none of {EMA_KEYS} and no "
                                      "'ema_*' buffers of the official EMA hook in its state_dict")
    return read_state_dict(path, use_ema=True), checkpoint_filter_fn


def _top_level_keys(path: str):
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - official files may pickle more than tensors; this is a local file
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return list(ckpt) if isinstance(ckpt, dict) else []


def _plainmamba(variant: str, defaults: dict, pretrained: bool = False, **kwargs) -> PlainMamba:
    """PlainMamba through timm's build_model_with_cfg (see timm_contract: local weights only)."""
    return build_backbone(PlainMamba, variant, pretrained, {**defaults, **kwargs}, filter_fn=checkpoint_filter_fn,
                          read_fn=read_official, out_indices=quarter_indices(defaults["depth"]))


@register_model
def plainmamba_l1(pretrained=False, **kwargs):
    """PlainMamba-L1 (224, 14x14 grid): width 192, depth 24, 1 stem conv, depthwise conv after block 0."""
    return _plainmamba("plainmamba_l1", ARCHS["L1"], pretrained=pretrained, **kwargs)


@register_model
def plainmamba_l2(pretrained=False, **kwargs):
    """PlainMamba-L2 (224, 14x14 grid): width 384, depth 24, 2 stem convs."""
    return _plainmamba("plainmamba_l2", ARCHS["L2"], pretrained=pretrained, **kwargs)


@register_model
def plainmamba_l3(pretrained=False, **kwargs):
    """PlainMamba-L3 (224, 14x14 grid): width 448, depth 36, 2 stem convs."""
    return _plainmamba("plainmamba_l3", ARCHS["L3"], pretrained=pretrained, **kwargs)


@register_model
def plainmamba_micro_patch4_56(pretrained=False, **kwargs):
    """CPU-sized PlainMamba for the built-in 56x56 data (14x14 grid like ImageNet), 10 classes."""
    return _plainmamba("plainmamba_micro_patch4_56", dict(img_size=56, patch_size=4, embed_dim=96, depth=6,
                                                          d_state=8, stem_chs=32, num_convs_patch_embed=1,
                                                          layers_with_dwconv=(0,), num_classes=10),
                       pretrained=pretrained, **kwargs)


@register_model
def plainmamba_test_32(pretrained=False, **kwargs):
    """Tiny random PlainMamba for unit tests (32x32 input, 8x8 grid); block 0 has L1's depthwise conv."""
    return _plainmamba("plainmamba_test_32", dict(img_size=32, patch_size=4, embed_dim=32, depth=4, d_state=4,
                                                  stem_chs=16, num_convs_patch_embed=1, layers_with_dwconv=(0,),
                                                  num_classes=10),
                       pretrained=pretrained, **kwargs)


__all__ = ["ARCHS", "OFFICIAL_DROP_PATH", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3",
           "plainmamba_micro_patch4_56", "plainmamba_test_32"]
