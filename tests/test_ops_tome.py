"""ToMe bipartite soft matching on a metric whose best pairs are obvious."""
import math

import pytest
import torch

from tokenprune.pruning.ops import (bipartite_soft_matching, keep_order_permutation, merge_wavg,
                                    proportional_attention_bias)


def hand_metric():
    """6 tokens; A = {0, 2, 4}, B = {1, 3, 5}.

    0 == 1 (cos 1), 4 ~ 5 (cos 0.98), 2 ~ 3 (cos 0.45): with r = 2 tokens 0 and 4 merge.
    """
    e = torch.eye(4, dtype=torch.float64)
    t = [e[0], e[0], e[1] + 0.5 * e[2], e[2], e[3] + 0.2 * e[0], e[3]]
    return torch.stack(t)[None] * torch.tensor([1.0, 2.0, 3.0, 1.0, 0.5, 7.0], dtype=torch.float64)[None, :, None]


def values(T=6, D=2):
    return torch.arange(T * D, dtype=torch.float64).view(1, T, D)


def test_expected_pairs_and_output_order():
    merge, unmerge, src = bipartite_soft_matching(hand_metric(), 2)
    assert src.tolist() == [[2, 1, 3, 5]]  # [unmerged A, B...]
    x = values()
    out = merge(x)
    assert out.shape == (1, 4, 2)
    torch.testing.assert_close(out[0, 0], x[0, 2])
    torch.testing.assert_close(out[0, 1], (x[0, 0] + x[0, 1]) / 2)
    torch.testing.assert_close(out[0, 2], x[0, 3])
    torch.testing.assert_close(out[0, 3], (x[0, 4] + x[0, 5]) / 2)
    torch.testing.assert_close(merge(x, mode="sum")[0, 1], x[0, 0] + x[0, 1])
    # every original token reads back the value of the token it went into
    un = unmerge(out)
    assert un.shape == (1, 6, 2)
    for t, o in {0: 1, 1: 1, 2: 0, 3: 2, 4: 3, 5: 3}.items():
        torch.testing.assert_close(un[0, t], out[0, o])
    # 2-D per-token tensors go through the same closures
    assert merge(torch.arange(6.0)[None], mode="sum").tolist() == [[2.0, 1.0, 3.0, 9.0]]


def test_keep_order_permutation():
    _, _, src = bipartite_soft_matching(hand_metric(), 2)
    perm = keep_order_permutation(src)
    assert perm.tolist() == [[1, 0, 2, 3]]
    assert src.gather(1, perm).tolist() == [[1, 2, 3, 5]]


def test_r_zero_is_identity():
    x = values()
    merge, unmerge, src = bipartite_soft_matching(hand_metric(), 0)
    assert merge(x) is x and unmerge(x) is x
    assert src.tolist() == [list(range(6))]
    xm, s = merge_wavg(merge, x)
    assert torch.equal(xm, x) and s.tolist() == [[1.0] * 6]


def test_r_is_clamped_to_half():
    merge, _, src = bipartite_soft_matching(hand_metric(), 10)
    assert src.shape == (1, 3)  # at most T_A = 3 removed
    assert merge(values()).shape == (1, 3, 2)


def test_protected_a_token_never_merged():
    prot = torch.tensor([[True, False, False, False, False, False]])
    merge, _, src = bipartite_soft_matching(hand_metric(), 2, protected=prot)
    # token 0 (the best pair) is protected, so 4 -> 5 and 2 -> 3 merge instead; CLS stays first
    assert src.tolist() == [[0, 1, 3, 5]]
    x = values()
    out = merge(x)
    torch.testing.assert_close(out[0, 0], x[0, 0])
    torch.testing.assert_close(out[0, 2], (x[0, 2] + x[0, 3]) / 2)
    # (T - protected) // 2 = 2 even when more is asked
    _, _, src = bipartite_soft_matching(hand_metric(), 5, protected=prot)
    assert src.shape == (1, 4)


def test_protected_b_token_never_receives():
    prot = torch.tensor([[False, True, False, False, False, False]])
    merge, _, src = bipartite_soft_matching(hand_metric(), 1, protected=prot)
    _, size = merge_wavg(merge, values())
    assert src.tolist() == [[0, 2, 1, 3, 5]]
    assert size.tolist() == [[1.0, 1.0, 1.0, 1.0, 2.0]]  # 4 -> 5, nothing into protected 1


def test_all_b_protected_gives_identity():
    prot = torch.tensor([[False, True, False, True, False, True]])
    _, _, src = bipartite_soft_matching(hand_metric(), 2, protected=prot)
    assert src.tolist() == [list(range(6))]


def test_merge_wavg_is_size_weighted():
    x = values()
    size = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    merge, _, _ = bipartite_soft_matching(hand_metric(), 2)
    xm, s = merge_wavg(merge, x, size)
    assert s.tolist() == [[1.0, 4.0, 1.0, 3.0]]
    torch.testing.assert_close(xm[0, 1], (3 * x[0, 0] + 1 * x[0, 1]) / 4)
    torch.testing.assert_close(xm[0, 3], (1 * x[0, 4] + 2 * x[0, 5]) / 3)
    assert s.sum() == size.sum()


def test_repeated_merging_keeps_total_size_and_batch():
    torch.manual_seed(0)
    B, T = 3, 197
    x, size = torch.randn(B, T, 8), None
    prot = torch.zeros(B, T, dtype=torch.bool)
    prot[:, 0] = True
    for _ in range(4):
        merge, _, src = bipartite_soft_matching(torch.randn(B, x.shape[1], 5), 16, protected=prot)
        cls_before = x[:, 0].clone()
        x, size = merge_wavg(merge, x, size)
        prot = merge(prot.float(), mode="amax") > 0
        assert (src[:, 0] == 0).all() and torch.equal(x[:, 0], cls_before)
        assert prot[:, 0].all() and prot.sum() == B
    assert x.shape == (B, T - 64, 8)
    torch.testing.assert_close(size.sum(1), torch.full((B,), float(T)))


def test_proportional_attention_bias():
    size = torch.tensor([[1.0, 2.0, 4.0]])
    bias = proportional_attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.tensor([0.0, math.log(2), math.log(4)]))


def test_errors():
    with pytest.raises(ValueError, match="r must be"):
        bipartite_soft_matching(hand_metric(), -1)
    with pytest.raises(ValueError, match="metric"):
        bipartite_soft_matching(torch.rand(6, 4), 1)
    with pytest.raises(ValueError, match="protected"):
        bipartite_soft_matching(hand_metric(), 1, protected=torch.zeros(1, 5, dtype=torch.bool))


def test_merge_wavg_in_one_merge_equals_two_merges_to_the_bit():
    """x and size merged together (same dtype) give exactly what merging them separately gives."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 41, 24, generator=g)
    size = torch.randint(1, 9, (3, 41), generator=g).float()
    merge, _, _ = bipartite_soft_matching(torch.randn(3, 41, 8, generator=g), r=15)
    merged, merged_size = merge_wavg(merge, x, size)
    want_sum, want_size = merge(x * size[..., None], mode="sum"), merge(size, mode="sum")
    assert torch.equal(merged_size, want_size)
    assert torch.equal(merged, want_sum / want_size[..., None])
    half, half_size = merge_wavg(merge, x.bfloat16(), size)  # dtypes differ: two merges, sizes stay fp32
    assert half.dtype == torch.bfloat16 and torch.equal(half_size, want_size)
