"""Make the <image> placeholders of tokenised prompts follow a visual-token budget.

The processors expand each <image> into as many placeholder ids as the unreduced model feeds (576 for
LLaVA-1.5); the model's merge (`get_placeholder_mask`) needs exactly as many as the reduced features.
Each image's placeholders must be one contiguous run; images are numbered row by row, run by run.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def placeholder_runs(row: torch.Tensor, token_id: int) -> List[Tuple[int, int]]:
    """(start, end) of each run of `token_id` in a 1-D tensor."""
    hit = (row == token_id).to(torch.int8)
    edges = torch.diff(torch.cat([hit.new_zeros(1), hit, hit.new_zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def padding_side_of(attention_mask: torch.Tensor) -> str:
    """'left' when some row starts with padding, 'right' when some row ends with it, else 'left'."""
    if bool((attention_mask[:, 0] == 0).any()):
        return "left"
    if bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return "left"


def fit_placeholders(input_ids: torch.Tensor, counts: Sequence[int], image_token_id: int,
                     attention_mask: Optional[torch.Tensor] = None, pad_token_id: int = 0,
                     padding_side: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace the i-th image's placeholder run by counts[i] placeholders; re-pad the batch.

    Text tokens keep their order; rows are re-padded on the side they were padded on (left by default, the
    side generation needs). Returns (input_ids, attention_mask).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    side = padding_side or padding_side_of(attention_mask)
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    rows, image = [], 0
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()]
        pieces, last = [], 0
        for start, end in placeholder_runs(ids, image_token_id):
            if image >= len(counts):
                raise ValueError(f"input_ids hold more <image> placeholder runs than the {len(counts)} images "
                                 "given (each image's placeholders must be one run, separated by text)")
            pieces += [ids[last:start], ids.new_full((int(counts[image]),), image_token_id)]
            last, image = end, image + 1
        rows.append(torch.cat(pieces + [ids[last:]]))
    if image != len(counts):
        raise ValueError(f"input_ids hold {image} <image> placeholder runs for {len(counts)} images")
    width = max(len(r) for r in rows)
    out = input_ids.new_full((len(rows), width), pad_token_id)
    mask = torch.zeros_like(out)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        out[i, sl], mask[i, sl] = r, 1
    return out, mask
