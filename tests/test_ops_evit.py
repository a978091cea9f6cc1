"""EViT selection and fusion on hand-made attention rows."""
import pytest
import torch

from tokenprune.pruning.ops import evit_fuse, evit_reduce, evit_select, keep_count_ceil

# CLS at 0; non-CLS attention: token 4 > 2 > 3 > 1 > 5
ATTN = torch.tensor([[0.50, 0.05, 0.15, 0.10, 0.20, 0.0]])


def tokens(T=6, D=3):
    return torch.arange(T * D, dtype=torch.float64).view(1, T, D)


def test_select_kept_descending_dropped_ascending_raw_weights():
    kept, dropped, w = evit_select(ATTN, 2)
    assert kept.tolist() == [[4, 2]]
    assert dropped.tolist() == [[1, 3, 5]]
    assert torch.equal(w, ATTN[:, [1, 3, 5]])  # raw, not renormalised


def test_select_cls_in_the_middle_and_no_cls():
    attn = torch.tensor([[0.1, 0.3, 0.9, 0.2]])  # CLS at 2 has the largest value but is never a candidate
    kept, dropped, _ = evit_select(attn, 2, cls_index=2)
    assert kept.tolist() == [[1, 3]] and dropped.tolist() == [[0]]
    kept, dropped, _ = evit_select(attn, 2, cls_index=None)
    assert kept.tolist() == [[2, 1]] and dropped.tolist() == [[0, 3]]


def test_fuse_is_exact_weighted_sum_and_sizes():
    x = tokens()
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 4.0]], dtype=torch.float64)
    fused, fs = evit_fuse(x, torch.tensor([[1, 3, 5]]), torch.tensor([[0.05, 0.10, 0.0]]), size)
    expect = 0.05 * x[0, 1] + 0.10 * x[0, 3] + 0.0 * x[0, 5]
    torch.testing.assert_close(fused[0, 0], expect)
    assert fs.tolist() == [[9.0]]
    _, fs1 = evit_fuse(x, torch.tensor([[1, 3, 5]]), torch.tensor([[0.05, 0.10, 0.0]]))
    assert fs1.tolist() == [[3.0]]


def test_reduce_official_layout():
    x = tokens()
    out, size, src = evit_reduce(x, None, ATTN, 2)
    assert out.shape == (1, 4, 3)
    assert src.tolist() == [[0, 4, 2]]  # CLS, kept by descending score; fused row last
    torch.testing.assert_close(out[0, :3], x[0, [0, 4, 2]])
    torch.testing.assert_close(out[0, 3], 0.05 * x[0, 1] + 0.10 * x[0, 3])
    assert size.tolist() == [[1.0, 1.0, 1.0, 3.0]]
    assert size.sum() == 6


def test_reduce_keep_order_for_ssms():
    x = tokens()
    out, _, src = evit_reduce(x, None, ATTN, 2, keep_order=True)
    assert src.tolist() == [[0, 2, 4]]
    torch.testing.assert_close(out[0, :3], x[0, [0, 2, 4]])
    # ViM-style CLS in the middle: ascending original order puts it between the kept tokens
    attn = torch.tensor([[0.05, 0.15, 0.10, 0.50, 0.20, 0.0]])
    _, _, src = evit_reduce(x, None, attn, 2, cls_index=3, keep_order=True)
    assert src.tolist() == [[1, 3, 4]]
    _, _, src = evit_reduce(x, None, attn, 2, cls_index=3, keep_order=False)
    assert src.tolist() == [[3, 4, 1]]


def test_reduce_nothing_dropped_is_identity():
    x = tokens()
    size = torch.rand(1, 6, dtype=torch.float64)
    out, s, src = evit_reduce(x, size, ATTN, 5)
    assert out is x and s is size
    assert src.tolist() == [list(range(6))]


def test_deit_s_token_schedule():
    B, T, D = 2, 197, 4
    x, size = torch.randn(B, T, D), None
    counts = []
    for _ in range(3):
        keep = keep_count_ceil(x.shape[1] - 1, 0.7)
        attn = torch.rand(B, x.shape[1])
        x, size, src = evit_reduce(x, size, attn, keep)
        counts.append(x.shape[1])
        assert src.shape == (B, x.shape[1] - 1)
        assert (src[:, 0] == 0).all()
        torch.testing.assert_close(size.sum(1), torch.full((B,), 197.0))
    assert counts == [138 + 2, 98 + 2, 70 + 2]


def test_errors():
    with pytest.raises(ValueError, match=r"keep must be an int in \[1, 5\].*got 6"):
        evit_select(ATTN, 6)
    with pytest.raises(ValueError, match="got 0"):
        evit_select(ATTN, 0)
    with pytest.raises(ValueError, match="cls_index"):
        evit_select(ATTN, 2, cls_index=6)
