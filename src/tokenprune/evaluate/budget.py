"""Budget solver: the per-stage keep ratio that meets a token (or FLOPs) reduction target.

A method's schedule applies the same keep ratio at each of its stages, so the *token reduction* (the fraction
of token·blocks saved, `PrunedModel.token_reduction()`) is a monotone step function of keep. The solver
bisects over keep in (0, 1] on a simulation of the token counts (no forward pass) and returns a short keep
ratio (few decimals) inside the step whose reduction is closest to the target.

* one-step methods (schedule "embed": PaPr, PaPr+SS, random, L2): keep = 1 - target exactly, the papers'
  convention ("40 % token reduction" = 60 % of the patches enter the encoder); the measured reduction, which
  also counts the CLS token, is reported beside it;
* multi-stage methods (EViT, ToP/HSA, ToMe, PuMer, UTR, VisionZip): tokens summed over blocks within about one
  token per block of the target whenever the schedule can reach it (ToMe merges at most half the tokens per
  block; an unreachable target gives the closest reachable keep and a warning).

`solve_keep_for_flops` does the same for a FLOPs ratio (pruned / unpruned, fvcore, proposal network included).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

from torch import nn

from ..pruning.methods import METHODS, as_backbone, create_model, resolve_schedule
from ..pruning.stage import BEFORE_ENCODER, PrunedModel

__all__ = ["solve_keep", "solve_keep_for_flops", "simulate", "is_one_step", "measured_token_reduction",
           "tokens_per_block_from_trace"]

_BISECT_STEPS = 40


def _backbone(backbone: Union[str, nn.Module]) -> nn.Module:
    return as_backbone(backbone)  # a name builds the model (random weights: only its structure is used)


def is_one_step(backbone: nn.Module, method: str, layers=None) -> bool:
    """True when the method reduces tokens once, before the first block (schedule "embed")."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    schedule = layers if layers is not None else METHODS[method].schedule
    return resolve_schedule(schedule, backbone.num_layers, backbone.reduction_point) == [BEFORE_ENCODER]


def _template(bb: nn.Module, method: str, options: dict) -> PrunedModel:
    """A PrunedModel whose stages' keep ratios the solver overwrites (keep 0.5 only to get the stages built)."""
    model = create_model(bb, method, keep=0.5, **options)
    if not model.stages:
        raise ValueError(f"method {method!r} built no reduction stage; nothing to solve")
    return model


def _set_keep(model: PrunedModel, keep: float) -> None:
    for s in model.stages:
        s.keep = float(keep)


def simulate(model: PrunedModel, keep: float) -> Tuple[Tuple[int, ...], float]:
    """(tokens entering each block, token reduction) of `model` with every stage at `keep` (no forward)."""
    _set_keep(model, keep)
    counts = tuple(model.tokens_per_block())
    return counts, model.token_reduction()


def _step_bounds(f: Callable[[float], tuple], keep: float, key: tuple) -> Tuple[float, float]:
    """The interval (lo, hi] of keep ratios around `keep` whose simulation gives the same `key`."""
    lo, hi = 0.0, keep  # lo: a keep with a different (smaller) key, or 0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if mid <= 0:
            break
        if f(mid) == key:
            hi = mid
        else:
            lo = mid
    left = hi
    lo, hi = keep, 1.0  # hi: a keep with a different (larger) key, or 1
    if f(1.0) == key:
        return left, 1.0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if f(mid) == key:
            lo = mid
        else:
            hi = mid
    return left, lo


def _short_keep(left: float, right: float) -> float:
    """The keep ratio with the fewest decimals in [left, right], nearest the middle of the interval.

    right == 1.0 only when keep 1.0 itself is in the step (`_step_bounds`); otherwise the answer stays below 1,
    even when the step ends a hair under it (an odd patch count whose first step drops a single token)."""
    if right == 1.0:
        return 1.0
    mid = (left + right) / 2
    for digits in range(1, 10):
        scale = 10 ** digits
        lo_i = math.ceil(left * scale - 1e-9)
        hi_i = min(math.floor(right * scale + 1e-9), scale - 1)
        if lo_i <= hi_i:
            best = min(range(lo_i, hi_i + 1), key=lambda i: abs(i / scale - mid))
            value = round(best / scale, digits)
            if value > 0:
                return value
    return round(mid, 12)


def _bisect_closest(f_value: Callable[[float], float], key_of: Callable[[float], tuple], target: float,
                    decreasing: bool) -> Tuple[float, float]:
    """Keep ratio whose monotone f_value is closest to target: (short keep, achieved value)."""
    lo, hi = 1e-9, 1.0  # f_value(lo) is the far side of the target, f_value(hi) the near side (keep 1)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        v = f_value(mid)
        past = v > target if decreasing else v < target  # this keep prunes more than the target asks
        if past:
            lo = mid
        else:
            hi = mid
    v_lo, v_hi = f_value(lo), f_value(hi)
    keep = lo if abs(v_lo - target) < abs(v_hi - target) else hi
    left, right = _step_bounds(key_of, keep, key_of(keep))
    return _short_keep(left, right), f_value(keep)


def solve_keep(backbone: Union[str, nn.Module], method: str, target_reduction: float, *,
               warn_tokens: float = 1.5, **method_options) -> float:
    """Per-stage keep ratio whose simulated token reduction is closest to `target_reduction`.

    backbone: a timm name or an already-built backbone module (cheapest: no weights are touched).
    method_options: keyword arguments of `tokenprune.create_model` (layers, smoothing, proposal, ...);
    they matter when they change the schedule (layers) or the token counting (reducer).
    warn_tokens: warn when the closest reachable reduction is further than this many tokens per block.
    """
    if not 0.0 <= target_reduction < 1.0:
        raise ValueError(f"target token reduction must be in [0, 1), got {target_reduction!r}")
    bb = _backbone(backbone)
    if target_reduction == 0.0:
        return 1.0
    if is_one_step(bb, method, method_options.get("layers")):
        return round(1.0 - target_reduction, 12)
    model = _template(bb, method, method_options)
    cache: Dict[float, Tuple[tuple, float]] = {}

    def sim(k: float):
        if k not in cache:
            cache[k] = simulate(model, k)
        return cache[k]

    keep, achieved = _bisect_closest(lambda k: sim(k)[1], lambda k: sim(k)[0], target_reduction, decreasing=True)
    off_tokens = abs(achieved - target_reduction) * bb.seq_len
    if off_tokens > warn_tokens:
        warnings.warn(f"{method} on {type(bb).__name__}: the closest reachable token reduction to "
                      f"{target_reduction:.3f} is {achieved:.3f} (keep {keep}); {off_tokens:.1f} tokens per block off",
                      stacklevel=2)
    return keep


def solve_keep_for_flops(backbone: Union[str, nn.Module], method: str, target_flops_ratio: float, *,
                         paper: bool = False, unpruned_flops: Optional[int] = None, **method_options) -> float:
    """Per-stage keep ratio whose FLOPs / unpruned FLOPs (fvcore, proposal included) is closest to the target.

    paper=True uses the ViM-paper convention (one scan direction). Each distinct token-count pattern is
    counted once (FLOPs depend on the counts only), so this takes ~10-20 fvcore counts.
    """
    from ..flops import count_flops

    if not 0.0 < target_flops_ratio <= 1.0:
        raise ValueError(f"target FLOPs ratio must be in (0, 1], got {target_flops_ratio!r}")
    bb = _backbone(backbone)
    if target_flops_ratio == 1.0:
        return 1.0

    def flops_of(m: nn.Module) -> int:
        rep = count_flops(m)
        return rep.paper if paper else rep.total

    base = unpruned_flops if unpruned_flops is not None else flops_of(create_model(bb))
    model = _template(bb, method, method_options)
    by_counts: Dict[tuple, float] = {}

    def key(k: float) -> tuple:
        return simulate(model, k)[0]

    def ratio(k: float) -> float:
        counts = key(k)
        if counts not in by_counts:
            _set_keep(model, k)
            by_counts[counts] = flops_of(model) / base
        return by_counts[counts]

    keep, _ = _bisect_closest(ratio, key, target_flops_ratio, decreasing=False)
    return keep


def tokens_per_block_from_trace(model: PrunedModel) -> Optional[list]:
    """Tokens each block saw in the last forward, from `model.token_trace` (None before any forward)."""
    bb = model.backbone
    n = bb.seq_len
    if not model.stages:
        return [n] * bb.num_layers
    trace = list(model.token_trace or [])
    if not trace:
        return None
    by_layer = {t.layer: t for t in trace}
    if BEFORE_ENCODER in by_layer:
        n = by_layer[BEFORE_ENCODER].tokens_out
    counts = []
    for i in range(bb.num_layers):
        if i in by_layer and bb.reduction_point == "mid":
            n = by_layer[i].tokens_out
        counts.append(n)
        if i in by_layer and bb.reduction_point == "post":
            n = by_layer[i].tokens_out
    return counts


def measured_token_reduction(model: PrunedModel) -> Optional[float]:
    """1 - (tokens summed over blocks in the last forward) / (unpruned tokens summed over blocks)."""
    counts = tokens_per_block_from_trace(model)
    if counts is None:
        return None
    return 1.0 - sum(counts) / (model.backbone.seq_len * len(counts))
