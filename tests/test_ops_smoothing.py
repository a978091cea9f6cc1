"""Score smoothing (eq. 1 of the PaPr+SS paper) and the grid helpers, checked against hand computation."""
import math

import pytest
import torch

from tokenprune.pruning.ops import gather_from_grid, scatter_to_grid, smooth_scores, smoothing_kernel

# A known, non-square 4 x 5 score map with distinct values.
S = [
    [0.9, 0.1, 0.4, 0.0, 0.7],
    [0.3, 0.8, 0.2, 0.6, 0.5],
    [0.0, 0.2, 1.0, 0.3, 0.1],
    [0.6, 0.4, 0.1, 0.9, 0.2],
]


def ref_smooth(S, k, border, mask=None):
    """Eq. (1) with explicit loops. mask[i][j] False = absent cell."""
    H, W, r = len(S), len(S[0]), k // 2
    mask = mask or [[True] * W for _ in range(H)]
    out = [[0.0] * W for _ in range(H)]
    for i in range(H):
        for j in range(W):
            num, den = 0.0, 0
            for p in range(i - r, i + r + 1):
                for q in range(j - r, j + r + 1):
                    inside = 0 <= p < H and 0 <= q < W
                    if border == "zero":
                        val, present = (S[p][q], mask[p][q]) if inside else (0.0, True)
                    elif border == "valid":
                        if not inside:
                            continue
                        val, present = S[p][q], mask[p][q]
                    else:  # replicate
                        pp, qq = min(max(p, 0), H - 1), min(max(q, 0), W - 1)
                        val, present = S[pp][qq], mask[pp][qq]
                    if present:
                        num += val
                        den += 1
            out[i][j] = num / den if den else 0.0
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("border", ["zero", "valid", "replicate"])
def test_mean_matches_eq1_by_hand(k, border):
    x = torch.tensor(S, dtype=torch.float64)[None]
    out = smooth_scores(x, k, border=border)
    assert out.shape == (1, 4, 5)
    torch.testing.assert_close(out[0], ref_smooth(S, k, border), rtol=0, atol=1e-12)


def test_pinned_values_on_arange_map():
    x = torch.arange(20, dtype=torch.float64).view(1, 4, 5)
    z, v, r = (smooth_scores(x, 3, border=b)[0] for b in ("zero", "valid", "replicate"))
    assert z[1, 1] == pytest.approx(54 / 9)  # fully inside: plain 3x3 mean
    assert z[0, 0] == pytest.approx((0 + 1 + 5 + 6) / 9)  # eq. 1 literally: divide by k^2
    assert v[0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)  # only in-grid cells
    assert r[0, 0] == pytest.approx((4 * 0 + 2 * 1 + 2 * 5 + 6) / 9)  # edge replication


def test_k1_is_bit_exact_identity():
    x = torch.rand(3, 4, 5)
    for border in ("zero", "valid", "replicate"):
        assert torch.equal(smooth_scores(x, 1, border=border), x)
        assert torch.equal(smooth_scores(x, 1, border=border, kind="gaussian"), x)


def test_batch_rows_are_independent():
    x = torch.rand(3, 4, 5, dtype=torch.float64)
    out = smooth_scores(x, 3, border="valid")
    for b in range(3):
        torch.testing.assert_close(out[b], ref_smooth(x[b].tolist(), 3, "valid"))


@pytest.mark.parametrize("border", ["zero", "valid", "replicate"])
def test_masked_mean_by_hand(border):
    mask = [[True, False, True, True, False],
            [False, True, True, False, True],
            [True, True, False, True, True],
            [False, False, True, True, True]]
    x = torch.tensor(S, dtype=torch.float64)
    m = torch.tensor(mask)
    x = x.masked_fill(~m, float("-inf"))  # absent cells may hold anything
    out = smooth_scores(x[None], 3, border=border, mask=m[None])[0]
    ref = ref_smooth(S, 3, border, mask)
    torch.testing.assert_close(out[m], ref[m], rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()


def test_masked_window_with_nothing_present_gives_zero():
    x = torch.full((1, 3, 3), 5.0)
    m = torch.zeros(1, 3, 3, dtype=torch.bool)
    m[0, 0, 0] = True
    out = smooth_scores(x, 3, border="valid", mask=m)
    assert out[0, 0, 0] == 5.0 and out[0, 1, 1] == 5.0  # (1,1) sees (0,0)
    m2 = torch.zeros(1, 5, 5, dtype=torch.bool)
    m2[0, 0, 0] = True
    out2 = smooth_scores(torch.full((1, 5, 5), 5.0), 3, border="valid", mask=m2)
    assert out2[0, 4, 4] == 0.0  # no present cell in its window


def test_gaussian_kernel_normalised_and_default_sigma():
    w = smoothing_kernel(5, "gaussian")
    wn = w / w.sum()
    assert wn.sum().item() == pytest.approx(1.0)
    sigma = 5 / 4
    assert (w[2, 3] / w[2, 2]).item() == pytest.approx(math.exp(-1 / (2 * sigma ** 2)), rel=1e-6)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))


def test_gaussian_on_constant_map():
    x = torch.full((2, 6, 7), 3.0, dtype=torch.float64)
    zero = smooth_scores(x, 3, border="zero", kind="gaussian")
    torch.testing.assert_close(zero[:, 1:-1, 1:-1], x[:, 1:-1, 1:-1])  # weights sum to 1 inside
    assert (zero[:, 0, 0] < 3.0).all()  # zero padding pulls edges down
    for border in ("valid", "replicate"):
        torch.testing.assert_close(smooth_scores(x, 5, border=border, kind="gaussian", sigma=0.7), x)


def test_gaussian_valid_border_by_hand():
    x = torch.tensor(S, dtype=torch.float64)[None]
    w = smoothing_kernel(3, "gaussian", dtype=torch.float64)
    out = smooth_scores(x, 3, border="valid", kind="gaussian")
    # corner (0, 0): in-grid cells are (0,0),(0,1),(1,0),(1,1), kernel weights w[1:,1:]
    vals = torch.tensor([[S[0][0], S[0][1]], [S[1][0], S[1][1]]], dtype=torch.float64)
    assert out[0, 0, 0].item() == pytest.approx(float((vals * w[1:, 1:]).sum() / w[1:, 1:].sum()))


def test_gradient_flows():
    x = torch.rand(1, 4, 5, requires_grad=True)
    smooth_scores(x, 3, border="valid").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("k", [0, 2, 4, -1, 3.0, True])
def test_bad_kernel_size(k):
    with pytest.raises(ValueError, match="kernel_size"):
        smooth_scores(torch.rand(1, 4, 5), k)


def test_bad_border_kind_mask_shape():
    x = torch.rand(1, 4, 5)
    with pytest.raises(ValueError, match="reflect"):
        smooth_scores(x, 3, border="reflect")
    with pytest.raises(ValueError, match="median"):
        smooth_scores(x, 3, kind="median")
    with pytest.raises(ValueError, match="mask"):
        smooth_scores(x, 3, mask=torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match="sigma"):
        smooth_scores(x, 3, kind="gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="B, H, W"):
        smooth_scores(torch.rand(4, 5), 3)


# ---- grid helpers -------------------------------------------------------------------------------------

def test_scatter_and_gather_grid_roundtrip():
    # 2 x 3 grid; tokens: CLS (-1), then patches 5, 0, 3 (others pruned)
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    pidx = torch.tensor([[-1, 5, 0, 3]])
    g, present = scatter_to_grid(values, pidx, (2, 3), fill=-1.0)
    assert g.tolist() == [[[2.0, -1.0, -1.0], [3.0, -1.0, 1.0]]]
    assert present.tolist() == [[[True, False, False], [True, False, True]]]
    back = gather_from_grid(g, pidx)
    assert back[0, 0] == float("-inf")
    assert back[0, 1:].tolist() == [1.0, 2.0, 3.0]
    assert gather_from_grid(g, pidx, fill=0.0)[0, 0] == 0.0


def test_grid_errors():
    with pytest.raises(ValueError, match="patch_index values"):
        scatter_to_grid(torch.rand(1, 2), torch.tensor([[0, 6]]), (2, 3))
    with pytest.raises(ValueError, match="same grid cell"):
        scatter_to_grid(torch.rand(1, 2), torch.tensor([[1, 1]]), (2, 3))
    with pytest.raises(ValueError, match="long"):
        scatter_to_grid(torch.rand(1, 2), torch.tensor([[0.0, 1.0]]), (2, 3))
    with pytest.raises(ValueError, match="grid"):
        scatter_to_grid(torch.rand(1, 2), torch.tensor([[0, 1]]), (0, 3))
