"""Reduce the visual tokens of one vision-tower feature layer, per tile, with the library's evaluators/reducers.

Input per tile: the feature layer's hidden states with the CLS at index 0 (N, 1 + P, D), the CLS attention row
of that layer summed over heads (N, 1 + P) and its head-averaged keys (N, 1 + P, C). Output: the tokens the
projector and the LLM get (N, budget, D) and, for each, the grid index of the patch it came from (-1: the CLS).

Methods (a preset of evaluator + reducer; the evaluator can be overridden by name):
- visionzip: dominant = the CLS + top tokens by CLS attention, contextual = merged by key similarity
  (the CLS is one of the dominant tokens, as in the official VisionZip code), order dominant then
  contextual;
- cls_attn / l2 / random: keep the top `budget` patches by that evaluator, in their original order;
- tome: ToMe bipartite merging on the keys, repeated (at most half the tokens per round) down to the budget,
  size-weighted averages, output in original order of each token's representative.
With the "default" select strategy LLaVA feeds the patches without the CLS (576); the prune and merge methods
keep that, VisionZip adds the CLS back as its first dominant token. With "full" the CLS is fed and protected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..pruning import ops, reducers
from ..pruning.evaluators import build_evaluator
from ..tokens.state import initial_state

# method -> (evaluator, reducer)
METHODS: Dict[str, Tuple[Optional[str], str]] = {
    "visionzip": ("cls_attn", "visionzip"),
    "cls_attn": ("cls_attn", "prune"),
    "l2": ("l2", "prune"),
    "random": ("random", "prune"),
    "tome": (None, "tome"),
}
VLM_EVALUATORS = ("cls_attn", "l2", "random")  # the library evaluators that need no backbone-specific signal


@dataclass(frozen=True)
class ReductionSpec:
    """What to keep per tile. `budget` counts every token the LLM gets for one tile (CLS included)."""
    method: str
    budget: int
    contextual: int = 0  # VisionZip only
    evaluator: Optional[str] = None
    mode: str = "add"
    seed: int = 0

    @property
    def reducer(self) -> str:
        return METHODS[self.method][1]

    @property
    def evaluator_name(self) -> Optional[str]:
        return self.evaluator or METHODS[self.method][0]

    @property
    def needs_attention(self) -> bool:
        return self.evaluator_name == "cls_attn" or self.reducer in ("visionzip", "tome")


def default_contextual(budget: int) -> int:
    """VisionZip's LLaVA split: 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 (contextual share 10/64)."""
    return max(1, round(budget * reducers.VISIONZIP_CONTEXTUAL_SHARE))


def make_spec(method: str = "visionzip", budget: int = 64, unreduced: int = 576, *,
              dominant: Optional[int] = None, contextual: Optional[int] = None, evaluator: Optional[str] = None,
              mode: str = "add", seed: int = 0) -> ReductionSpec:
    """Validate a reduction request against the `unreduced` tokens per tile; errors name the bad value."""
    if method not in METHODS:
        raise ValueError(f"unknown visual-token method {method!r}; expected one of {sorted(METHODS)}")
    if evaluator is not None and evaluator not in VLM_EVALUATORS:
        raise ValueError(f"unknown evaluator {evaluator!r} for a VLM; expected one of {list(VLM_EVALUATORS)}")
    if evaluator is not None and METHODS[method][1] == "tome":
        raise ValueError("method 'tome' merges by key similarity and takes no evaluator, "
                         f"got evaluator={evaluator!r}")
    if mode not in ("add", "mean"):
        raise ValueError(f"unknown VisionZip mode {mode!r}; expected 'add' or 'mean'")
    if method != "visionzip" and (dominant is not None or contextual is not None):
        raise ValueError(f"dominant/contextual split VisionZip's budget; method {method!r} takes a budget only, "
                         f"got dominant={dominant!r}, contextual={contextual!r}")
    if method == "visionzip" and dominant is not None:
        if contextual is None:
            raise ValueError(f"dominant={dominant!r} needs contextual too (budget = dominant + contextual)")
        if isinstance(dominant, bool) or not isinstance(dominant, int) or dominant < 1:
            raise ValueError(f"dominant must be an int >= 1 (the CLS is one of them), got {dominant!r}")
        budget = dominant + contextual if isinstance(contextual, int) else budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 (visual tokens per tile), got {budget!r}")
    if budget > unreduced:
        raise ValueError(f"budget {budget} is larger than the {unreduced} visual tokens a tile has")
    ctx = 0
    if method == "visionzip" and budget < unreduced:
        ctx = default_contextual(budget) if contextual is None else contextual
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 0:
            raise ValueError(f"contextual must be an int >= 0, got {ctx!r}")
        if budget - ctx < 1:
            raise ValueError(f"dominant = budget - contextual = {budget} - {ctx} = {budget - ctx}; it must be "
                             ">= 1 (the CLS is a dominant token)")
    return ReductionSpec(method, budget, ctx, evaluator, mode, seed)


def cls_attention_and_keys(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """From a layer's q/k projections (N, T, H*hd): the CLS attention row summed over heads (N, T) and the
    head-averaged keys (N, T, hd), in fp32. Softmax scale hd^-0.5, as CLIP's attention."""
    N, T, C = q.shape
    hd = C // num_heads
    qh = q.float().view(N, T, num_heads, hd).transpose(1, 2)  # (N, H, T, hd)
    kh = k.float().view(N, T, num_heads, hd).transpose(1, 2)
    row = (qh[:, :, :1] @ kh.transpose(-1, -2)).squeeze(2) * hd ** -0.5  # (N, H, T)
    return row.softmax(dim=-1).sum(dim=1), kh.mean(dim=1)


def _tome_to(x, keys, budget, pos):
    """ToMe rounds on [x, keys] (merging is linear per channel) until `budget` tokens are left."""
    D = x.shape[-1]
    joint, size = torch.cat([x.float(), keys.float()], -1), None
    while joint.shape[1] > budget:
        n = int(joint.shape[1])
        merge, _, src = ops.bipartite_soft_matching(joint[..., D:], min(n - budget, n // 2))
        joint, size = ops.merge_wavg(merge, joint, size)
        pos = pos.gather(1, src)
    order = ops.keep_order_permutation(pos)
    return ops.batched_gather(joint[..., :D], order).to(x.dtype), pos.gather(1, order)


def reduce_tiles(hidden: torch.Tensor, spec: ReductionSpec, grid: Tuple[int, int], cls_attn=None, keys=None,
                 feed_cls: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduce (N, 1 + P, D) feature-layer tokens to (N, budget, D); also the grid index of each (-1 = CLS).

    feed_cls: the select strategy feeds the CLS ("full"); else the unreduced tokens are the P patches.
    """
    N, T, _ = hidden.shape
    P = grid[0] * grid[1]
    if T != P + 1:
        raise ValueError(f"expected the CLS + {P} patch tokens of a {grid} grid, got {T} tokens")
    unreduced = T if feed_cls else P
    if spec.budget == unreduced:
        x = hidden if feed_cls else hidden[:, 1:]
        idx = torch.arange(-1 if feed_cls else 0, P, device=hidden.device).expand(N, -1)
        return x, idx
    signals = {}
    if cls_attn is not None:
        signals["cls_attn"] = cls_attn
    if keys is not None:
        signals["keys"] = keys
    if spec.reducer == "visionzip":
        state = initial_state(hidden, grid, special=[0], cls_at=0)
        scores = build_evaluator(spec.evaluator_name, seed=spec.seed)(state, signals)
        out = reducers.visionzip(state, scores, signals, keep=spec.budget - 1, contextual=spec.contextual,
                                 mode=spec.mode)
        return out.x, out.patch_index()
    if not feed_cls:  # the patches alone, as LLaVA's "default" strategy feeds them
        hidden = hidden[:, 1:]
        signals = {k: v[:, 1:] for k, v in signals.items()}
    state = initial_state(hidden, grid, special=[0] if feed_cls else [], cls_at=0 if feed_cls else None)
    if spec.reducer == "tome":
        pos = state.patch_index()
        if feed_cls:  # the CLS is fed as is; only the patches merge
            x, pos_p = _tome_to(hidden[:, 1:], signals["keys"][:, 1:], spec.budget - 1, pos[:, 1:])
            return torch.cat([hidden[:, :1], x], 1), torch.cat([pos[:, :1], pos_p], 1)
        return _tome_to(hidden, signals["keys"], spec.budget, pos)
    scores = build_evaluator(spec.evaluator_name, seed=spec.seed)(state, signals)
    out = reducers.prune(state, scores, signals, keep=spec.budget - (1 if feed_cls else 0))
    return out.x, out.patch_index()
