"""timm's model contract for our backbones: the classifier head and pooling (`TimmHeadMixin`), gradient
checkpointing, feature maps and the data config. The entry-point builders are in `registry.py`.

"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..compat import feature_take_indices


def run_layer(layer, enabled: bool, *args, **kwargs):
    """layer(*args, **kwargs), under activation checkpointing when enabled and gradients are on: the
    block's activations are recomputed in backward instead of stored (same RNG state, so the same
    DropPath masks)."""
    if enabled and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def tokens_to_map(tokens: torch.Tensor, grid: Tuple[int, int], output_fmt: str = "NCHW") -> torch.Tensor:
    """(B, H*W, C) patch tokens in raster order -> (B, C, H, W) or (B, H, W, C)."""
    x = tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])
    if output_fmt == "NHWC":
        return x
    if output_fmt != "NCHW":
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    return x.permute(0, 3, 1, 2).contiguous()


def model_data_config(model) -> dict:
    """timm.data.resolve_model_data_config of the timm model inside a wrapper (PrunedModel.backbone,
    TimmViT.vit, PlainClassifier.model); {} when none carries a pretrained cfg."""
    from timm.data import resolve_model_data_config

    seen = 0
    while model is not None and getattr(model, "pretrained_cfg", None) is None and seen < 4:
        model = next((getattr(model, a) for a in ("backbone", "vit", "model") if hasattr(model, a)), None)
        seen += 1
    if model is None or getattr(model, "pretrained_cfg", None) is None:
        return {}
    return resolve_model_data_config(model)


class TimmHeadMixin:
    """The parts of timm's model contract that ViM and PlainMamba share: classifier access and reset, gradient
    checkpointing switch, pruning of intermediate layers. The class names its final norm in FINAL_NORM and its
    pooling choices in POOLS; blocks live in ``self.layers``."""

    FINAL_NORM = "norm"
    POOLS: Tuple[str, ...] = ()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (also on the pruning path)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in self.POOLS:
                raise ValueError(f"global_pool must be one of {self.POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the blocks after the last index (and the final norm / head when asked); returns the indices."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.depth = len(self.layers)
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            setattr(self, self.FINAL_NORM, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take
