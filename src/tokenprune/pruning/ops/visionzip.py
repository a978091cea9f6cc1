"""VisionZip (Yang et al., CVPR 2025): dominant tokens + contextual tokens.

Matches dvlab-research/VisionZip (``visionzip/clip_encoder.py``):
- dominant: the CLS plus the top (dominant - 1) tokens by attention (CLS row summed over heads), taken
  out in their original order;
- contextual: the remaining R tokens (original order) are split into targets, chosen by a uniform stride
  step = max(1, R // contextual) (the first ``contextual`` of range(0, R, step)), and the others, each
  assigned to its most similar target (argmax of cosine on keys);
- contextual token = target + mean of its assigned tokens. The official code divides by the count clamped
  to 1, so a target with nothing assigned stays the target's hidden state unchanged.
Output: dominant tokens then contextual tokens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .select import batched_gather, complement_indices

MODES = ("add", "mean")


def visionzip_reduce(
    x: torch.Tensor,
    attn_score: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    size: Optional[torch.Tensor] = None,
    cls_index: Optional[int] = 0,
    mode: str = "add",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduce T tokens to dominant + contextual.

    Args:
        x: (B, T, D) hidden states.
        attn_score: (B, T) attention each token gets (CLS row, or attention received without a CLS).
        keys: (B, T, C) similarity features (head-averaged keys).
        dominant: tokens kept as they are, CLS included when cls_index is not None (then >= 1).
        contextual: merged tokens, 0 <= contextual <= T - dominant (0 drops the rest).
        size: (B, T) or None (ones). A contextual token's size is its target's plus its assigned sizes.
        cls_index: CLS position (always dominant), or None when there is no CLS.
        mode: "add" (official: target + mean of assigned) or "mean" (size-weighted average of the
            target and its assigned tokens; a plain average when sizes are 1).

    Returns:
        x_out (B, dominant + contextual, D), size_out (B, dominant + contextual),
        src_index (B, dominant + contextual): original index of each dominant token and of each
        contextual token's target. Dominant indices are ascending.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VisionZip mode {mode!r}; expected one of {MODES}")
    if x.dim() != 3 or attn_score.shape != x.shape[:2] or keys.dim() != 3 or keys.shape[:2] != x.shape[:2]:
        raise ValueError(f"x (B, T, D), attn_score (B, T) and keys (B, T, C) must agree, got "
                         f"{tuple(x.shape)}, {tuple(attn_score.shape)}, {tuple(keys.shape)}")
    B, T, D = (int(s) for s in x.shape)  # python ints also under jit tracing (FLOP counting)
    has_cls = cls_index is not None
    if has_cls and not (isinstance(cls_index, int) and 0 <= cls_index < T):
        raise ValueError(f"cls_index must be an int in [0, {T - 1}] or None, got {cls_index!r}")
    if isinstance(dominant, bool) or not isinstance(dominant, int) or not (int(has_cls) <= dominant <= T):
        raise ValueError(f"dominant must be an int in [{int(has_cls)}, {T}], got {dominant!r}")
    R = T - dominant
    if isinstance(contextual, bool) or not isinstance(contextual, int) or not (0 <= contextual <= R):
        raise ValueError(f"contextual must be an int in [0, {R}] (tokens left after {dominant} dominant), "
                         f"got {contextual!r}")
    if size is None:
        size = torch.ones(B, T, dtype=x.dtype, device=x.device)

    # Dominant: stable descending sort with the CLS forced to the front.
    score = attn_score.detach()
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    if has_cls:
        order = order.gather(1, torch.sort((order != cls_index).to(torch.int8), dim=1, stable=True).indices)
    dom = order[:, :dominant].sort(dim=1).values
    rest = complement_indices(dom, T)  # (B, R), original order
    x_dom, s_dom = batched_gather(x, dom), size.gather(1, dom)
    if contextual == 0:
        return x_dom, s_dom, dom

    step = max(1, R // contextual)
    local = torch.arange(R, device=x.device)
    is_tgt = (local % step == 0) & (local < contextual * step)  # the first `contextual` of range(0, R, step)
    # a stable sort on the flag lists targets last, each group ascending (no boolean-mask indexing)
    by_flag = torch.sort(is_tgt.to(torch.int8), stable=True).indices
    tgt_local, mrg_local = by_flag[R - contextual:], by_flag[: R - contextual]
    tgt, mrg = rest[:, tgt_local], rest[:, mrg_local]  # (B, c), (B, R - c)

    with torch.no_grad():
        k = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = batched_gather(k, mrg) @ batched_gather(k, tgt).transpose(1, 2)  # (B, R - c, c)
        assign = sim.argmax(dim=-1)
    # Out-of-place scatter of a tensor: jit tracing has no scatter_ with a float scalar.
    onehot = torch.zeros(B, int(mrg.shape[1]), contextual, dtype=x.dtype, device=x.device).scatter(
        2, assign[..., None], torch.ones_like(assign[..., None], dtype=x.dtype))

    x_tgt, x_mrg = batched_gather(x, tgt), batched_gather(x, mrg)
    s_tgt, s_mrg = size.gather(1, tgt), size.gather(1, mrg)
    s_ctx = s_tgt + torch.einsum("bmc,bm->bc", onehot.to(size.dtype), s_mrg)
    if mode == "add":
        counts = onehot.sum(dim=1).clamp(min=1)[..., None]
        x_ctx = x_tgt + onehot.transpose(1, 2) @ x_mrg / counts
    else:
        w = s_mrg.to(x.dtype)[..., None]
        x_ctx = (x_tgt * s_tgt.to(x.dtype)[..., None] + onehot.transpose(1, 2) @ (x_mrg * w)) \
            / s_ctx.to(x.dtype)[..., None]
    return (torch.cat([x_dom, x_ctx], dim=1), torch.cat([s_dom, s_ctx], dim=1),
            torch.cat([dom, tgt], dim=1))
