"""Importance evaluators: (state, signals) -> one score per current token (higher = keep).

Each evaluator declares the backbone signals it needs, so a backbone computes attention maps or SSM
outputs only at the blocks where they are used, and an impossible combination fails at construction.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Set

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import version_counter
from ..models.proposal import fold_batchnorm
from ..tokens import TokenState


class Evaluator(nn.Module):
    needs: Set[str] = set()
    name = "?"

    def forward(self, state: TokenState, signals: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class RandomScore(Evaluator):
    """Uniform random scores; seeded per call when `seed` is given, so runs are reproducible."""
    name = "random"

    def __init__(self, seed: Optional[int] = 0):
        super().__init__()
        self.seed = seed

    def forward(self, state, signals):
        if state.x.device.type != "cpu" and self.seed is not None:
            return hashed_uniform(state.pos.shape, self.seed + state.num_tokens, state.x.device)
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed + state.num_tokens)
        return torch.rand(state.pos.shape, generator=gen).to(state.x.device)


def hashed_uniform(shape, seed: int, device) -> torch.Tensor:
    """Reproducible uniform [0, 1) values made on `device` from a counter hash (no CPU generator, no host
    copy, so a CUDA graph can capture it): a 31-bit multiply-xorshift of (seed, element index)."""
    mask = (1 << 31) - 1
    h = (torch.arange(math.prod(shape), device=device, dtype=torch.int64) + (seed * 0x9E3779B1 & mask)) & mask
    for mult in (0x2C1B3C6D, 0x297A2D39):  # products stay below 2**62: no int64 overflow on any device
        h = ((h ^ (h >> 15)) * mult) & mask
    h = h ^ (h >> 13)
    return (h.to(torch.float32) / float(1 << 31)).reshape(shape)


class L2Score(Evaluator):
    """Naive pruning: the L2 norm of each token's hidden state (the patch embedding before the encoder)."""
    name = "l2"

    def forward(self, state, signals):
        return state.x.float().norm(dim=-1)


class SignalScore(Evaluator):
    """A score the backbone computes: cls_attn (EViT), attn_received, ssm_out (ToP), ssm_out_ungated (ablation)."""

    def __init__(self, signal: str):
        super().__init__()
        self.signal, self.name, self.needs = signal, signal, {signal}

    def forward(self, state, signals):
        return signals[self.signal].float()


class ClsSimilarityScore(Evaluator):
    """EViT-style score for attention-free backbones: softmax over tokens of <x_cls, x_i> / sqrt(D).

    ViM has no attention map; the CLS token's affinity to each token is the closest analogue of the CLS
    attention row, so EViT / PuMer style methods can run on it through the same reducers.
    """
    name = "cls_similarity"

    def forward(self, state, signals):
        if state.cls_index is None:
            raise ValueError("cls_similarity needs a CLS token; this backbone has none (use l2 or ssm_out)")
        x = state.x.float()
        cls = x[:, state.cls_index:state.cls_index + 1]
        return ((x @ cls.transpose(1, 2)).squeeze(-1) / x.shape[-1] ** 0.5).softmax(dim=-1)


class PaPrScore(Evaluator):
    """PaPr: a frozen lightweight ConvNet scores the image once; channel mean of its last feature map,
    resized to the patch grid (bicubic, align_corners=True), read out at each token's grid position."""
    name = "papr"
    needs = {"images"}

    def __init__(self, proposal: nn.Module, input_size: Optional[int] = None):
        super().__init__()
        if input_size is not None and (isinstance(input_size, bool) or int(input_size) < 8):
            raise ValueError(f"proposal_size must be an int >= 8 (pixels) or None, got {input_size!r}")
        self.proposal = proposal.eval()
        self.input_size = None if input_size is None else int(input_size)
        for p in self.proposal.parameters():
            p.requires_grad_(False)
        self.__dict__["_fast"] = (None, None)  # (key, folded copy): not a submodule, so not in the state dict

    def fast_proposal(self) -> nn.Module:
        """The proposal with conv+BN folded (and channels-last on CUDA), rebuilt when its weights move or change
        (keyed by device, storage and version counters: python attributes, no device read-back)."""
        params = list(self.proposal.parameters()) + list(self.proposal.buffers())
        key = tuple((t.device, t.dtype, t.data_ptr(), version_counter(t)) for t in params)
        cached_key, fast = self.__dict__.get("_fast", (None, None))
        if fast is None or cached_key != key:
            fast = fold_batchnorm(self.proposal)
            if params and params[0].device.type == "cuda":
                fast = fast.to(memory_format=torch.channels_last)
            self.__dict__["_fast"] = (key, fast)
        return fast

    def train(self, mode: bool = True):  # the proposal network stays frozen (BN statistics included)
        super().train(mode)
        self.proposal.eval()
        return self

    def score_map(self, images: torch.Tensor, grid) -> torch.Tensor:
        if self.input_size is not None and tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            # a cheaper proposal pass on a smaller image; the score map is resized to the grid anyway
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        # fvcore traces the registered network (FLOPs and per-module attribution as before, BN included)
        # (and torch.compile sees it too: building the folded copy is Python work it cannot trace)
        net = self.proposal if torch.jit.is_tracing() or torch.compiler.is_compiling() else self.fast_proposal()
        if images.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        feats = net.forward_features(images) if hasattr(net, "forward_features") else net(images)
        if feats.dim() != 4:
            raise ValueError(f"PaPr proposal network must give a (B, C, h, w) feature map, got {tuple(feats.shape)}")
        saliency = feats.float().mean(dim=1, keepdim=True)
        return F.interpolate(saliency, size=tuple(grid), mode="bicubic", align_corners=True)[:, 0]

    def forward(self, state, signals):
        grid_scores = self.score_map(signals["images"], state.grid)  # (B, H, W)
        flat = grid_scores.flatten(1)
        idx = state.patch_index()
        scores = flat.gather(1, idx.clamp(min=0))
        return torch.where(idx >= 0, scores, torch.full_like(scores, float("inf")))


def build_evaluator(name: str, proposal: Optional[nn.Module] = None, seed: Optional[int] = 0,
                    proposal_size: Optional[int] = None) -> Evaluator:
    if name == "random":
        return RandomScore(seed)
    if name == "l2":
        return L2Score()
    if name in ("cls_attn", "attn_received", "ssm_out", "ssm_out_ungated"):
        return SignalScore(name)
    if name == "cls_similarity":
        return ClsSimilarityScore()
    if name == "papr":
        if proposal is None:
            raise ValueError("evaluator 'papr' needs a proposal ConvNet: pass proposal=<timm name or module> "
                             "and proposal_checkpoint=<local file>")
        return PaPrScore(proposal, input_size=proposal_size)
    raise ValueError(f"unknown evaluator {name!r}; expected one of {sorted(EVALUATORS)}")


EVALUATORS = ("random", "l2", "cls_attn", "attn_received", "ssm_out", "ssm_out_ungated", "cls_similarity", "papr")
