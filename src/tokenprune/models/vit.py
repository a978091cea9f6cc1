"""timm ViT / DeiT behind the token interface.

The wrapped timm model is used as is: an unpruned block runs timm's own Block.forward (fused attention,
LayerScale, qk-norm, registers all respected), so keep ratio 1.0 gives timm's logits bit for bit. Only a
block whose hook asks for attention signals, or whose tokens carry merge sizes (ToMe's proportional
attention), runs the explicit attention below, built from the same submodules.
"""
from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from ..compat import vit_pos_embed
from ..tokens.state import TokenState, initial_state
from .base import TokenBackbone


def attention_with_signals(attn: Attention, x: torch.Tensor, needs: Set[str], cls_index: Optional[int],
                           size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """timm Attention.forward with the attention map exposed and an optional log-size bias (ToMe)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :].to(q.dtype)  # proportional attention
    signals: Dict[str, torch.Tensor] = {}
    if needs & {"cls_attn", "attn_received"} or not attn.fused_attn:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        if "cls_attn" in needs:
            signals["cls_attn"] = probs[:, :, cls_index, :].mean(1)
        if "attn_received" in needs:
            signals["attn_received"] = probs.mean(1).mean(1)
        out = attn.attn_drop(probs) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    if "keys" in needs:
        signals["keys"] = k.mean(1)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), signals


class TimmViT(TokenBackbone):
    """Token interface over a timm VisionTransformer (reduction between attention and MLP, as EViT/ToMe)."""

    reduction_point = "mid"
    is_ssm = False

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"TimmViT wraps timm VisionTransformer models, got {type(vit).__name__}")
        if getattr(vit, "attn_pool", None) is not None or getattr(vit, "dynamic_img_size", False):
            raise ValueError("attention pooling and dynamic image size are not supported for token reduction")
        for i, blk in enumerate(vit.blocks):
            if not isinstance(blk.attn, Attention):
                raise ValueError(f"block {i} uses {type(blk.attn).__name__}; only timm's Attention is supported")
        self.vit = vit
        self.has_cls = vit.cls_token is not None
        self.num_protected = vit.num_prefix_tokens
        self.grid = tuple(vit.patch_embed.grid_size)
        self.num_classes = vit.num_classes
        self.signals = {"hidden", "attn_received", "keys"} | ({"cls_attn"} if self.has_cls else set())

    @property
    def num_layers(self) -> int:
        return len(self.vit.blocks)

    def embed(self, images: torch.Tensor) -> TokenState:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit_pos_embed(vit, vit.patch_embed(images))))
        return initial_state(x, self.grid, special=tuple(range(vit.num_prefix_tokens)),
                             cls_at=0 if self.has_cls else None)

    def run_block(self, i: int, state: TokenState, hook=None) -> TokenState:
        blk = self.vit.blocks[i]
        size = state.size if state.extras.get("prop_attn") else None
        if hook is None and size is None:
            return state.with_tokens(x=blk(state.x))
        needs = set(getattr(hook, "needs", set()))
        out, signals = attention_with_signals(blk.attn, blk.norm1(state.x), needs, state.cls_index, size)
        state = state.with_tokens(x=state.x + blk.drop_path1(blk.ls1(out)))
        if hook is not None:
            signals["hidden"] = state.x
            state = hook(state, signals)
        x = state.x
        return state.with_tokens(x=x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))))

    def norm_tokens(self, state: TokenState) -> torch.Tensor:
        return self.vit.norm(state.x)

    def classify(self, state: TokenState) -> torch.Tensor:
        vit = self.vit
        x = vit.norm(state.x)
        if vit.global_pool in ("avg", "avgmax", "max") and not state.extras.get("reduced"):
            return vit.forward_head(x)
        if vit.global_pool == "token":
            feats = x[:, state.cls_index]
        elif vit.global_pool == "avg":  # merged tokens stand for `size` patches: size-weighted mean
            weight = (state.size * (~state.protected)).unsqueeze(-1)
            feats = (x * weight).sum(1) / weight.sum(1)
        else:
            raise ValueError(f"global_pool={vit.global_pool!r} is not supported after token reduction")
        return vit.head(vit.head_drop(vit.fc_norm(feats)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)
