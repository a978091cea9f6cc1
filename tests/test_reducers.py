"""Reducers on SSM token states: the fp32 residual stream is merged in fp32 when the hidden states are bf16."""
import pytest
import torch

from tokenprune.pruning import reducers
from tokenprune.tokens import initial_state

GRID = (4, 4)
T = 17  # 16 patches + a middle CLS, as ViM


def _state(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 8, generator=g).to(torch.bfloat16).to(dtype)  # the same values in both dtypes
    residual = 1000.0 + torch.randn(2, T, 8, generator=g)  # needs fp32: bf16 keeps 3 significant digits here
    return initial_state(x, GRID, special=(T // 2,), cls_at=T // 2, residual=residual)


def _signals(state):
    g = torch.Generator().manual_seed(1)
    return {"hidden": state.x.float(), "keys": torch.randn(2, T, 8, generator=g)}


@pytest.mark.parametrize("name, options", [("tome", {"metric": "hidden"}), ("evit", {}), ("visionzip", {}),
                                           ("pumer", {}), ("utr", {})])
def test_merge_reducers_keep_the_fp32_residual_exact_under_bf16_hidden_states(name, options):
    scores = torch.rand(2, T, generator=torch.Generator().manual_seed(2))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        state = _state(dtype)
        out[dtype] = reducers.get_reducer(name)(state, scores, _signals(state), keep=10, **options)
    lo, hi = out[torch.bfloat16], out[torch.float32]
    assert lo.x.dtype == torch.bfloat16 and lo.residual.dtype == torch.float32
    assert lo.x.is_contiguous() and hi.x.is_contiguous()
    assert torch.equal(lo.pos, hi.pos)
    assert torch.equal(lo.residual, hi.residual)  # merged in fp32 both times, never rounded to bf16
    assert torch.equal(lo.x, hi.x.to(torch.bfloat16))
    assert not torch.equal(lo.residual, lo.residual.to(torch.bfloat16).float())  # fp32 values, not bf16 ones
    inputs = _state(torch.float32).residual.reshape(-1, 8)
    merged = [not (row == inputs).all(-1).any() for row in lo.residual.reshape(-1, 8)]
    assert any(merged)  # some output rows are merges, not copies of an input row
