"""UTR-style hybrid and vision-only PuMer: counts, order, sizes and the exact merges on hand-made inputs."""
import pytest
import torch

from tokenprune.pruning.ops import pumer_reduce, utr_reduce

PROT = torch.tensor([[True] + [False] * 7])


def x8(D=3):
    return torch.arange(8 * D, dtype=torch.float64).view(1, 8, D) ** 1.3


def utr_metric():
    e = torch.eye(3, dtype=torch.float64)
    t = {0: e[0], 1: e[1], 2: e[0], 3: e[1] + e[2], 4: e[0] + 0.5 * e[2], 5: e[0], 6: e[2], 7: e[1] + 0.1 * e[0]}
    return torch.stack([t[i] for i in range(8)])[None]


# kept (keep = 3): 1, 3, 6 (+ CLS 0); removed by ascending score: 5, 2 (dropped), 7, 4 (merged)
UTR_SCORES = torch.tensor([[0.0, 0.9, 0.1, 0.8, 0.3, 0.05, 0.7, 0.2]])


def test_utr_hand_example():
    x = x8()
    out, size, src = utr_reduce(x, None, UTR_SCORES, utr_metric(), keep=3, prune_fraction=0.5, protected=PROT)
    assert src.tolist() == [[0, 1, 3, 6]]
    torch.testing.assert_close(out[0, 0], x[0, 0])  # CLS untouched although token 4 is closest to it
    torch.testing.assert_close(out[0, 1], (x[0, 1] + x[0, 7]) / 2)
    torch.testing.assert_close(out[0, 2], x[0, 3])
    torch.testing.assert_close(out[0, 3], (x[0, 6] + x[0, 4]) / 2)
    assert size.tolist() == [[1.0, 2.0, 1.0, 2.0]]  # 8 - 2 dropped


def test_utr_size_weighted_and_extremes():
    x = x8()
    s = torch.tensor([[1.0, 3.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    out, size, _ = utr_reduce(x, s, UTR_SCORES, utr_metric(), 3, 0.5, PROT)
    torch.testing.assert_close(out[0, 1], (3 * x[0, 1] + x[0, 7]) / 4)
    torch.testing.assert_close(out[0, 3], (x[0, 6] + 2 * x[0, 4]) / 3)
    assert size.tolist() == [[1.0, 4.0, 1.0, 3.0]]
    # prune_fraction 0: everything removed is merged, nothing lost
    _, size, _ = utr_reduce(x, None, UTR_SCORES, utr_metric(), 3, 0.0, PROT)
    assert size.sum() == 8
    # prune_fraction 1: plain pruning
    out, size, src = utr_reduce(x, None, UTR_SCORES, utr_metric(), 3, 1.0, PROT)
    torch.testing.assert_close(out, x[:, [0, 1, 3, 6]])
    assert size.sum() == 4
    # keep 0: no merge target but the CLS, which never receives a merge
    out, size, src = utr_reduce(x, None, UTR_SCORES, utr_metric(), 0, 0.0, PROT)
    assert src.tolist() == [[0]] and size.tolist() == [[1.0]]


def test_utr_batch_counts_and_order():
    torch.manual_seed(0)
    B, T = 2, 40
    prot = torch.zeros(B, T, dtype=torch.bool)
    prot[:, 20] = True  # ViM-style middle CLS
    out, size, src = utr_reduce(torch.randn(B, T, 5), None, torch.rand(B, T), torch.randn(B, T, 4), 25, 0.4, prot)
    assert out.shape == (B, 26, 5)
    assert torch.equal(src, src.sort(1).values) and (src == 20).any(1).all()
    torch.testing.assert_close(size.sum(1), torch.full((B,), float(T - 6)))  # round(0.4 * 14) = 6 dropped


def test_utr_errors():
    with pytest.raises(ValueError, match="prune_fraction"):
        utr_reduce(x8(), None, UTR_SCORES, utr_metric(), 3, 1.5, PROT)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 7\]"):
        utr_reduce(x8(), None, UTR_SCORES, utr_metric(), 8, 0.5, PROT)


def pumer_metric():
    e = torch.eye(4, dtype=torch.float64)
    t = {0: e[0], 1: e[1], 2: e[1] + 0.05 * e[2], 3: e[0], 4: e[2], 5: e[3], 6: e[0], 7: e[2] + e[3]}
    return torch.stack([t[i] for i in range(8)])[None]


def test_pumer_hand_example():
    # prune 3 and 6 (lowest); survivors [0, 1, 2, 4, 5, 7] -> A = {0, 2, 5}, B = {1, 4, 7}; CLS protected.
    # r = 1 merges 2 into 1; ToMe order [0, 5, 1, 4, 7] is put back to ascending.
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.7, 0.6, 0.05, 0.5]])
    x = x8()
    out, size, src = pumer_reduce(x, None, scores, pumer_metric(), prune_keep=5, merge_r=1, protected=PROT)
    assert src.tolist() == [[0, 1, 4, 5, 7]]
    torch.testing.assert_close(out[0], torch.stack([x[0, 0], (x[0, 1] + x[0, 2]) / 2, x[0, 4], x[0, 5], x[0, 7]]))
    assert size.tolist() == [[1.0, 2.0, 1.0, 1.0, 1.0]]


def test_pumer_counts_order_sizes():
    torch.manual_seed(1)
    B, T = 3, 30
    prot = torch.zeros(B, T, dtype=torch.bool)
    prot[:, 0] = True
    x = torch.randn(B, T, 6)
    out, size, src = pumer_reduce(x, None, torch.rand(B, T), torch.randn(B, T, 4), 20, 5, prot)
    assert out.shape == (B, 16, 6)
    assert torch.equal(src, src.sort(1).values) and (src[:, 0] == 0).all()
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(size.sum(1), torch.full((B,), 21.0))
    # merge_r 0: plain pruning in ascending order
    out, size, src = pumer_reduce(x, None, torch.rand(B, T), torch.randn(B, T, 4), 20, 0, prot)
    assert out.shape == (B, 21, 6) and torch.equal(src, src.sort(1).values)


def test_pumer_errors():
    with pytest.raises(ValueError, match="merge_r"):
        pumer_reduce(x8(), None, UTR_SCORES, utr_metric(), 3, -1, PROT)
