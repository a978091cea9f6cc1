"""timm registry entries for PlainMamba: `import tokenprune` then `timm.create_model("plainmamba_l3")`.

Official mmcls files (`{"state_dict": {"backbone.*", "head.fc.*", ...}, "meta": ...}`) load strictly with
`checkpoint_file=<path>`; `use_ema=True` picks the EMA weights, either the official EMA hook's `ema_*`
buffers inside `state_dict` or a separate `state_dict_ema` / `model_ema` entry. Nothing is downloaded.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.models import register_model

from .checkpoint import EMA_KEYS, CheckpointMismatchError, load_checkpoint_file, load_strict, read_state_dict
from .plainmamba import PlainMamba, checkpoint_filter_fn
from .vim_registry import build_with_checkpoint

# The official arch_zoo (mmcls backbone `arch="L1" | "L2" | "L3"`).
ARCHS = {
    "L1": dict(embed_dim=192, depth=24, num_convs_patch_embed=1, layers_with_dwconv=(0,)),
    "L2": dict(embed_dim=384, depth=24, num_convs_patch_embed=2, layers_with_dwconv=()),
    "L3": dict(embed_dim=448, depth=36, num_convs_patch_embed=2, layers_with_dwconv=()),
}
# drop_path_rate of the official ImageNet recipes (plain_mamba_l{1,2,3}_in1k_300e.py), for fine-tuning.
OFFICIAL_DROP_PATH = {"L1": 0.2, "L2": 0.2, "L3": 0.4}


def _load(model: PlainMamba, path: str, use_ema: bool) -> None:
    if not use_ema:
        load_checkpoint_file(model, path, checkpoint_filter_fn)
        return
    flat = read_state_dict(path, use_ema=False)
    if any(k.startswith("ema_") for k in flat):  # the official EMA hook's buffers
        try:
            state_dict = checkpoint_filter_fn(flat, model, use_ema_buffers=True)
        except KeyError as err:
            raise CheckpointMismatchError(f"{path}: {err.args[0]}") from None
        load_strict(model, state_dict, source=path)
    else:
        if not set(_top_level_keys(path)) & set(EMA_KEYS):
            raise CheckpointMismatchError(f"{path}: use_ema=True but the file has none of {EMA_KEYS} and no "
                                          "'ema_*' buffers of the official EMA hook in its state_dict")
        load_checkpoint_file(model, path, checkpoint_filter_fn, use_ema=True)


def _top_level_keys(path: str):
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - official files may pickle more than tensors; this is a local file
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return list(ckpt) if isinstance(ckpt, dict) else []


def _plainmamba(defaults: dict, pretrained: bool = False, checkpoint_file: Optional[str] = None,
                use_ema: bool = False, **kwargs) -> PlainMamba:
    model = build_with_checkpoint(PlainMamba, checkpoint_filter_fn, defaults, pretrained=pretrained,
                                  checkpoint_file=None, **kwargs)
    if checkpoint_file:
        _load(model, checkpoint_file, use_ema)
    return model


@register_model
def plainmamba_l1(pretrained=False, **kwargs):
    """PlainMamba-L1 (224, 14x14 grid): width 192, depth 24, 1 stem conv, depthwise conv after block 0."""
    return _plainmamba(ARCHS["L1"], pretrained=pretrained, **kwargs)


@register_model
def plainmamba_l2(pretrained=False, **kwargs):
    """PlainMamba-L2 (224, 14x14 grid): width 384, depth 24, 2 stem convs."""
    return _plainmamba(ARCHS["L2"], pretrained=pretrained, **kwargs)


@register_model
def plainmamba_l3(pretrained=False, **kwargs):
    """PlainMamba-L3 (224, 14x14 grid): width 448, depth 36, 2 stem convs."""
    return _plainmamba(ARCHS["L3"], pretrained=pretrained, **kwargs)


@register_model
def plainmamba_micro_patch4_56(pretrained=False, **kwargs):
    """CPU-sized PlainMamba for the built-in 56x56 data (14x14 grid like ImageNet), 10 classes."""
    return _plainmamba(dict(img_size=56, patch_size=4, embed_dim=96, depth=6, d_state=8, stem_chs=32,
                            num_convs_patch_embed=1, layers_with_dwconv=(0,), num_classes=10),
                       pretrained=pretrained, **kwargs)


@register_model
def plainmamba_test_32(pretrained=False, **kwargs):
    """Tiny random PlainMamba for unit tests (32x32 input, 8x8 grid); block 0 has L1's depthwise conv."""
    return _plainmamba(dict(img_size=32, patch_size=4, embed_dim=32, depth=4, d_state=4, stem_chs=16,
                            num_convs_patch_embed=1, layers_with_dwconv=(0,), num_classes=10),
                       pretrained=pretrained, **kwargs)


__all__ = ["ARCHS", "OFFICIAL_DROP_PATH", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3",
           "plainmamba_micro_patch4_56", "plainmamba_test_32"]
