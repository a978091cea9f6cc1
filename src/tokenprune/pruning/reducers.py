"""Reducers: apply a token budget to a TokenState given importance scores and backbone signals.

Every reducer keeps protected tokens. On SSM backbones the residual stream is reduced with the hidden
states (merges act on [x, residual] concatenated, which is exact because every merge is linear per channel)
and the result is put back into scan order with the CLS in the middle.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ..tokens import TokenState
from ..tokens.state import middle_cls_permutation

# The VisionZip paper's LLaVA budget 54 dominant + 10 contextual = 64 tokens: contextual share 10/64.
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64


def _joint(state: TokenState) -> torch.Tensor:
    """[x, residual] in the wider of their dtypes: under autocast x is bf16/fp16 but ViM's residual stream is
    fp32 (as the official model keeps it), and merging it in x's dtype would round it at every stage."""
    if state.residual is None:
        return state.x
    dtype = max((state.x.dtype, state.residual.dtype), key=lambda d: d.itemsize)  # python, no dispatch
    return torch.cat([state.x.to(dtype), state.residual.to(dtype)], -1)


def _split(state: TokenState, joint: torch.Tensor, src_index: torch.Tensor, size: torch.Tensor,
           extra_pos: int = 0) -> TokenState:
    """New state from merged [x, residual] rows; pos/protected follow src_index, `extra_pos` rows are new.

    Only pos and protected are gathered: x, residual and size come merged (gathering them too would be two
    wasted launches per stage, one of them over the whole hidden state)."""
    pos, protected = state.pos.gather(1, src_index), state.protected.gather(1, src_index)
    if extra_pos:
        B = src_index.shape[0]
        pos = torch.cat([pos, pos.new_full((B, extra_pos), -1)], 1)
        protected = torch.cat([protected, protected.new_zeros(B, extra_pos)], 1)
    D = state.x.shape[-1]
    residual = None if state.residual is None else joint[..., D:].to(state.residual.dtype)
    x = joint[..., :D]
    x = x.contiguous() if x.dtype == state.x.dtype else x.to(state.x.dtype)  # .to makes a contiguous copy
    return state.with_tokens(x=x, residual=residual, size=size.to(state.size.dtype),
                             pos=pos, protected=protected)


def n_free(state: TokenState) -> int:
    return state.num_tokens - state.n_protected  # python ints: the device is never read


def _protected_in_a(state: TokenState) -> Optional[int]:
    """Protected tokens in ToMe's set A (even positions) when the state knows where they are: only the CLS."""
    if state.n_protected == 0:
        return 0
    if state.n_protected == 1 and state.cls_index is not None:
        return 1 - state.cls_index % 2
    return None


def prune(state, scores, signals, keep: int, **_):
    idx = ops.topk_indices(scores, keep, protected=state.protected, keep_order=True, n_protected=state.n_protected)
    return state.gather(idx, cls_index=state.cls_index)


def evit(state, scores, signals, keep: int, keep_order: bool = False, **_):
    """Keep `keep` tokens by CLS attention, fuse the rest into one token (raw weights), appended last."""
    if state.cls_index is None:
        raise ValueError("EViT fusion needs a CLS token")
    kept, dropped, weight = ops.evit_select(scores, keep, cls_index=state.cls_index)
    if keep_order:
        kept = kept.sort(dim=1).values
    joint = _joint(state)
    fused, fused_size = ops.evit_fuse(joint, dropped, weight, size=state.size)
    cls = torch.full_like(kept[:, :1], state.cls_index)
    src = torch.cat([cls, kept], 1)
    rows = joint.gather(1, src.unsqueeze(-1).expand(-1, -1, joint.shape[-1]))
    size = torch.cat([state.size.gather(1, src), fused_size], 1)
    out = _split(state, torch.cat([rows, fused], 1), src, size, extra_pos=1)
    return out.with_tokens(cls_index=0)


def tome(state, scores, signals, keep: int, metric: str = "keys", **_):
    r = n_free(state) - keep
    merge, _, src = ops.bipartite_soft_matching(signals[metric], r, protected=state.protected,
                                                n_protected=state.n_protected, protected_a=_protected_in_a(state))
    joint, size = ops.merge_wavg(merge, _joint(state), state.size)
    out = _split(state, joint, src, size)
    out.extras["prop_attn"] = True  # ToMe's proportional attention from here on
    return out


def visionzip(state, scores, signals, keep: int, mode: str = "add", contextual: Optional[int] = None, **_):
    n_prot = state.n_protected
    ctx = contextual if contextual is not None else max(1, round(keep * VISIONZIP_CONTEXTUAL_SHARE))
    ctx = min(ctx, keep)
    dominant = n_prot + keep - ctx if state.cls_index is not None else keep - ctx
    x, size, src = ops.visionzip_reduce(_joint(state), scores, signals["keys"], dominant, ctx, size=state.size,
                                        cls_index=state.cls_index, mode=mode)
    return _split(state, x, src, size)


def pumer(state, scores, signals, keep: int, metric: str = "hidden", **_):
    removal = n_free(state) - keep
    prune_keep = n_free(state) - (removal + 1) // 2
    x, size, src = ops.pumer_reduce(_joint(state), state.size, scores, signals[metric], prune_keep,
                                    prune_keep - keep, protected=state.protected, n_protected=state.n_protected)
    return _split(state, x, src, size)


def utr(state, scores, signals, keep: int, metric: str = "hidden", prune_fraction: float = 0.5, **_):
    x, size, src = ops.utr_reduce(_joint(state), state.size, scores, signals[metric], keep,
                                  prune_fraction=prune_fraction, protected=state.protected,
                                  n_protected=state.n_protected)
    return _split(state, x, src, size)


REDUCERS = {"prune": prune, "evit": evit, "tome": tome, "visionzip": visionzip, "pumer": pumer, "utr": utr}
# Signals each reducer needs beyond the scores (the metric is chosen per backbone by the method).
REDUCER_SIGNALS = {"tome": {"keys"}, "visionzip": {"keys"}}


def restore_scan_order(state: TokenState) -> TokenState:
    """SSMs: sort tokens by original position (fused extras last), then the CLS back to the middle. One
    permutation (the sort composed with the static move of the CLS), so every per-token field is gathered once."""
    key = state.pos.masked_fill(state.pos < 0, state.seq_len)
    if state.cls_index is None:
        return state.gather(key.argsort(dim=1, stable=True), cls_index=None)
    order = key.masked_fill(state.protected, -1).argsort(dim=1, stable=True)  # the CLS first ...
    T = state.num_tokens
    order = order.index_select(1, middle_cls_permutation(T, 0, order.device))  # ... then to the middle
    return state.gather(order, cls_index=(T - 1) // 2)


def set_alignment(state: TokenState, mode: Optional[str]) -> TokenState:
    """Record the hidden-state alignment the following SSM blocks apply (None, 'mask' or 'gap')."""
    extras = dict(state.extras)
    extras["align"] = mode
    if mode == "gap":
        extras["gaps"] = ops.scan_gaps_unordered(state.pos, state.seq_len)
    return state.with_tokens(extras=extras)


def smooth(state: TokenState, scores: torch.Tensor, kernel_size: int, border: str = "zero",
           kind: str = "mean") -> torch.Tensor:
    """Score smoothing on the 2-D grid of original positions (masked mean where tokens are gone)."""
    if kernel_size == 1:
        return scores
    patch_index = state.patch_index()
    grid_vals, present = ops.scatter_to_grid(scores.masked_fill(patch_index < 0, 0.0), patch_index, state.grid)
    smoothed = ops.smooth_scores(grid_vals, kernel_size, border=border, mask=present, kind=kind)
    out = ops.gather_from_grid(smoothed, patch_index)
    return torch.where(patch_index >= 0, out, scores)


def unknown(kind: str, value, valid) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; expected one of {sorted(valid)}")


def get_reducer(name: str):
    if name not in REDUCERS:
        raise unknown("reducer", name, REDUCERS)
    return REDUCERS[name]


def signals_for(reducer: str, metric: Optional[str]) -> set:
    needs = set(REDUCER_SIGNALS.get(reducer, set()))
    if metric and reducer in ("tome", "pumer", "utr"):
        needs = (needs - {"keys"}) | {metric}
    return needs

