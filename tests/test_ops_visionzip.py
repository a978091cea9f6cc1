"""VisionZip dominant + contextual tokens on a hand-built example."""
import pytest
import torch

from tokenprune.pruning.ops import visionzip_reduce

# T = 8, CLS at 0. Non-CLS attention: 5 (0.9) and 2 (0.8) are the top two.
ATTN = torch.tensor([[9.0, 0.1, 0.8, 0.2, 0.05, 0.9, 0.3, 0.15]])


def keys():
    """Remaining tokens after dominant {0, 2, 5}: 1, 3, 4, 6, 7 (R = 5). With contextual = 2 the stride is
    5 // 2 = 2, so the targets are remaining[0] = 1 and remaining[2] = 4. Token 3 looks like 1; 6 and 7
    look like 4."""
    k = torch.zeros(1, 8, 2, dtype=torch.float64)
    k[0, :, 0] = 1.0
    for t in (4, 6, 7):
        k[0, t] = torch.tensor([0.0, 1.0])
    k[0, 3] = torch.tensor([2.0, 0.1])
    k[0, 6] *= 5  # cosine ignores the norm
    return k


def x():
    return torch.arange(8 * 3, dtype=torch.float64).view(1, 8, 3) ** 1.5


def test_dominant_targets_assignments_add():
    xs = x()
    out, size, src = visionzip_reduce(xs, ATTN, keys(), dominant=3, contextual=2)
    assert src.tolist() == [[0, 2, 5, 1, 4]]
    assert out.shape == (1, 5, 3)
    torch.testing.assert_close(out[0, :3], xs[0, [0, 2, 5]])
    torch.testing.assert_close(out[0, 3], xs[0, 1] + xs[0, 3])  # target + mean of [3]
    torch.testing.assert_close(out[0, 4], xs[0, 4] + (xs[0, 6] + xs[0, 7]) / 2)  # target + mean of [6, 7]
    assert size.tolist() == [[1.0, 1.0, 1.0, 2.0, 3.0]]
    assert size.sum() == 8


def test_mean_mode_is_true_average():
    xs = x()
    out, size, _ = visionzip_reduce(xs, ATTN, keys(), 3, 2, mode="mean")
    torch.testing.assert_close(out[0, 3], (xs[0, 1] + xs[0, 3]) / 2)
    torch.testing.assert_close(out[0, 4], (xs[0, 4] + xs[0, 6] + xs[0, 7]) / 3)
    # with sizes the average is size-weighted
    s = torch.tensor([[1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    out, size, _ = visionzip_reduce(xs, ATTN, keys(), 3, 2, size=s, mode="mean")
    torch.testing.assert_close(out[0, 3], (2 * xs[0, 1] + xs[0, 3]) / 3)
    assert size.tolist() == [[1.0, 1.0, 1.0, 3.0, 5.0]]


def test_target_with_nothing_assigned_stays_unchanged():
    k = keys()
    k[0, 3] = torch.tensor([0.0, 1.0])  # now 3, 6, 7 all go to target 4
    xs = x()
    out, size, _ = visionzip_reduce(xs, ATTN, k, 3, 2)
    torch.testing.assert_close(out[0, 3], xs[0, 1])  # count clamped to 1, nothing added
    torch.testing.assert_close(out[0, 4], xs[0, 4] + (xs[0, 3] + xs[0, 6] + xs[0, 7]) / 3)
    assert size.tolist() == [[1.0, 1.0, 1.0, 1.0, 4.0]]


def test_no_cls_and_no_contextual():
    xs = x()
    out, size, src = visionzip_reduce(xs, ATTN, keys(), 2, 0, cls_index=None)
    assert src.tolist() == [[0, 5]]  # top 2 overall, ascending
    assert out.shape == (1, 2, 3) and size.tolist() == [[1.0, 1.0]]
    _, _, src = visionzip_reduce(xs, ATTN, keys(), 1, 0)
    assert src.tolist() == [[0]]  # only the CLS


def test_cls_elsewhere_is_always_dominant():
    attn = ATTN.clone()
    attn[0, 0], attn[0, 3] = 0.2, 0.0  # CLS at 3 with the lowest score
    _, _, src = visionzip_reduce(x(), attn, keys(), 3, 0, cls_index=3)
    assert src.tolist() == [[2, 3, 5]]


def test_all_remaining_as_targets_and_batch():
    torch.manual_seed(0)
    B, T, D = 3, 20, 4
    xs, a, k = torch.randn(B, T, D), torch.rand(B, T), torch.randn(B, T, 6)
    out, size, src = visionzip_reduce(xs, a, k, 5, 15)  # every remaining token is a target
    dom = src[:, :5]
    torch.testing.assert_close(out[:, 5:], torch.stack([xs[b, src[b, 5:]] for b in range(B)]))
    assert (dom[:, 0] == 0).all() and torch.equal(dom, dom.sort(1).values)
    out, size, src = visionzip_reduce(xs, a, k, 5, 4)
    assert out.shape == (B, 9, D)
    torch.testing.assert_close(size.sum(1), torch.full((B,), float(T)))


def test_errors():
    with pytest.raises(ValueError, match=r"contextual must be an int in \[0, 5\].*got 6"):
        visionzip_reduce(x(), ATTN, keys(), 3, 6)
    with pytest.raises(ValueError, match="dominant"):
        visionzip_reduce(x(), ATTN, keys(), 0, 2)
    with pytest.raises(ValueError, match="mode"):
        visionzip_reduce(x(), ATTN, keys(), 3, 2, mode="avg")
