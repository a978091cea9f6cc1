"""The token interface every backbone exposes, so pruning methods stay backbone-agnostic.

A backbone is run as embed -> run_block(i) for every block -> classify. A pruning schedule passes a hook to
run_block; the backbone computes the signals the hook asks for (hook.needs) only then, so fused attention
and fast scans stay on otherwise, and calls hook(state, signals) at its reduction point.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol, Set

import torch
from torch import nn

from ..tokens.state import TokenState

# Signals a backbone can compute at a block on request. Shapes are per token (B, T) unless noted.
SIGNAL_DOCS = {
    "cls_attn": "head-averaged attention row of the CLS query over all tokens (ViT)",
    "attn_received": "attention each token receives, averaged over heads and queries (ViT)",
    "keys": "head-averaged attention keys (B, T, C) (ViT)",
    "ssm_out": "clipped (>= 0), channel-summed SSM output (after the silu(z) gate, the tensor the official ToP "
               "code reads), every scan direction mapped back to token order and summed (SSMs)",
    "ssm_out_ungated": "the same before the silu(z) gate (an ablation, not ToP's definition) (SSMs)",
    "hidden": "the block's output hidden states (B, T, D) (all)",
}


SSM_SIGNALS = frozenset({"ssm_out", "ssm_out_ungated"})


def clipped_channel_sum(*directions: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """ToP's importance: each direction's output clipped at 0, summed over channels, summed over directions."""
    return sum(y.float().clamp(min=0).sum(dim) for y in directions)


class ReductionHook(Protocol):
    needs: Set[str]

    def __call__(self, state: TokenState, signals: Dict[str, torch.Tensor]) -> TokenState: ...


class TokenBackbone(nn.Module):
    """Base class: subclasses implement embed, run_block, classify and declare `signals`."""

    signals: Set[str] = {"hidden"}
    reduction_point: str = "post"  # "mid": between attention and MLP (ViT); "post": after the block (SSMs)
    is_ssm: bool = False
    has_cls: bool = True

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """Tokens after embedding (patches + CLS / registers)."""
        return self.grid[0] * self.grid[1] + self.num_protected

    num_protected: int = 0  # CLS / register tokens that are never reduced

    def embed(self, images: torch.Tensor) -> TokenState:
        raise NotImplementedError

    def run_block(self, i: int, state: TokenState, hook: Optional[ReductionHook] = None) -> TokenState:
        raise NotImplementedError

    def classify(self, state: TokenState) -> torch.Tensor:
        """Final norm, pooling / CLS read-out and the classifier (`head` is the Linear's official name)."""
        raise NotImplementedError

    def hidden_tokens(self, state: TokenState) -> torch.Tensor:
        """The hidden states of the current tokens between blocks (ViM: the residual stream)."""
        return state.x

    def norm_tokens(self, state: TokenState) -> torch.Tensor:
        """The current tokens after the final norm (what the pooling / CLS read-out sees)."""
        raise NotImplementedError

    def forward_tokens(self, images: torch.Tensor,
                       hooks: Optional[Dict[int, ReductionHook]] = None,
                       before: Optional[Callable[[TokenState, torch.Tensor], TokenState]] = None) -> torch.Tensor:
        """Unpruned when hooks/before are None; `before` reduces tokens once before the first block."""
        state = self.embed(images)
        if before is not None:
            state = before(state, images)
        for i in range(self.num_layers):
            state = self.run_block(i, state, (hooks or {}).get(i))
        return self.classify(state)

    def check_signals(self, needs: Set[str], what: str) -> None:
        missing = set(needs) - set(self.signals)
        if missing:
            raise ValueError(f"{what} needs signal(s) {sorted(missing)} that {type(self).__name__} cannot give "
                             f"(it gives {sorted(self.signals)}); " + "; ".join(
                                 f"{m}: {SIGNAL_DOCS.get(m, '?')}" for m in sorted(missing)))
