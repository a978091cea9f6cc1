"""Hidden-state alignment helpers: gap counts, the delta/B trick, masking and restricted scan orders."""
import pytest
import torch

from tokenprune.tokens import (gap_scale, gap_scaled_delta_B, gather_from_sequence, restricted_order,
                                    scan_gaps, scatter_to_sequence)


def test_scan_gaps_by_hand():
    pos = torch.tensor([[0, 2, 3, 7], [1, 4, 5, 9]])
    fwd, bwd = scan_gaps(pos, 10)
    assert fwd.dtype == torch.long
    assert fwd.tolist() == [[0, 1, 0, 3], [1, 2, 0, 3]]
    # backward scan runs 9, 8, ...: before token 7 come the pruned 9 and 8
    assert bwd.tolist() == [[1, 0, 3, 2], [2, 0, 3, 0]]
    assert (fwd.sum(1) + 4 == 10 - bwd[:, -1]).all()  # every pruned position counted once


def test_scan_gaps_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        scan_gaps(torch.tensor([[0, 3, 3]]), 5)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        scan_gaps(torch.tensor([[0, 5]]), 5)
    with pytest.raises(ValueError, match="long"):
        scan_gaps(torch.tensor([[0.0, 1.0]]), 5)


def ref_scan(delta, A, B, C, u):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t. delta, u (E, L); A (E, N); B, C (N, L)."""
    E, L = u.shape
    h = torch.zeros(E, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, None] * A) * h + delta[:, t, None] * B[None, :, t] * u[:, t, None]
        ys.append((h * C[None, :, t]).sum(-1))
    return torch.stack(ys, dim=1)


def gap_scan(delta, A, B, C, u, gap):
    """Direct recurrence with decay exp((1 + g) delta A) and input delta B u."""
    E, L = u.shape
    h = torch.zeros(E, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(L):
        g = float(gap[t])
        h = torch.exp((1 + g) * delta[:, t, None] * A) * h + delta[:, t, None] * B[None, :, t] * u[:, t, None]
        ys.append((h * C[None, :, t]).sum(-1))
    return torch.stack(ys, dim=1)


def rand_ssm(E=3, N=4, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    delta = torch.nn.functional.softplus(d(E, L) - 0.5)
    A = -torch.exp(d(E, N))
    return delta, A, d(N, L) - 0.5, d(N, L) - 0.5, d(E, L) - 0.5


def test_gap_scaled_delta_B_reproduces_gap_decay():
    delta, A, B, C, u = rand_ssm()
    gap = torch.tensor([[2, 0, 1, 3, 0, 1]])
    d2, B2 = gap_scaled_delta_B(delta[None], B[None], gap)
    torch.testing.assert_close(ref_scan(d2[0], A, B2[0], C, u), gap_scan(delta, A, B, C, u, gap[0]))
    assert gap_scale(gap).dtype == torch.float32 and gap_scale(gap).tolist() == [[3.0, 1.0, 2.0, 4.0, 1.0, 2.0]]
    # grouped B (b, G, N, L) is scaled the same way
    _, Bg = gap_scaled_delta_B(delta[None], B[None, None].expand(1, 2, -1, -1), gap)
    torch.testing.assert_close(Bg[0, 1], B2[0])


def test_gap_decay_equals_masking_when_delta_is_constant_over_time():
    """With a per-channel constant delta, zero-input pruned positions decay the state by exactly
    exp((1 + g) delta A), so masking (a) and gap-aware decay (b) agree, in both scan directions."""
    E, N, L = 3, 4, 10
    delta, A, B, C, u = rand_ssm(E, N, L, seed=1)
    delta = delta[:, :1].expand(E, L).contiguous()
    pos = torch.tensor([[1, 2, 5, 6, 9]])
    fwd, bwd = scan_gaps(pos, L)
    p = pos[0]
    u_mask = torch.zeros_like(u)
    u_mask[:, p] = u[:, p]
    # forward
    full = ref_scan(delta, A, B, C, u_mask)[:, p]
    d2, B2 = gap_scaled_delta_B(delta[None, :, p], B[None, :, p], fwd)
    torch.testing.assert_close(ref_scan(d2[0], A, B2[0], C[:, p], u[:, p]), full)
    # backward: run on the flipped sequence, gaps flipped into that order
    full_b = ref_scan(delta.flip(1), A, B.flip(1), C.flip(1), u_mask.flip(1)).flip(1)[:, p]
    pf = p.flip(0)
    d2, B2 = gap_scaled_delta_B(delta[None, :, pf], B[None, :, pf], bwd.flip(1))
    torch.testing.assert_close(ref_scan(d2[0], A, B2[0], C[:, pf], u[:, pf]).flip(1), full_b)


def test_gap_scaled_delta_B_errors():
    with pytest.raises(ValueError, match="same b and L"):
        gap_scaled_delta_B(torch.rand(1, 3, 6), torch.rand(1, 4, 6), torch.zeros(1, 5, dtype=torch.long))


def test_scatter_gather_sequence():
    x = torch.arange(1.0, 7.0).view(1, 3, 2)
    pos = torch.tensor([[0, 3, 4]])
    full = scatter_to_sequence(x, pos, 6)
    assert full.tolist() == [[[1, 2], [0, 0], [0, 0], [3, 4], [5, 6], [0, 0]]]
    assert torch.equal(gather_from_sequence(full, pos), x)
    assert scatter_to_sequence(x, pos, 6, fill=-1.0)[0, 1].tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError, match="repeated"):
        scatter_to_sequence(x, torch.tensor([[0, 3, 3]]), 6)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        scatter_to_sequence(x, torch.tensor([[0, 3, 6]]), 6)


def test_restricted_order_on_3x4_zigzags():
    H, W = 3, 4
    grid = torch.arange(H * W).view(H, W)
    row_snake = torch.cat([grid[0], grid[1].flip(0), grid[2]])  # 0..3, 7..4, 8..11
    col_snake = torch.cat([grid[:, 0], grid[:, 1].flip(0), grid[:, 2], grid[:, 3].flip(0)])
    kept = torch.tensor([[1, 2, 4, 6, 9, 11], [0, 3, 5, 7, 8, 10]])

    perm = restricted_order(row_snake, kept)
    assert perm.tolist()[0] == [0, 1, 3, 2, 4, 5]
    assert kept.gather(1, perm).tolist() == [[1, 2, 6, 4, 9, 11], [0, 3, 7, 5, 8, 10]]
    perm = restricted_order(col_snake, kept)
    assert kept.gather(1, perm).tolist() == [[4, 9, 1, 2, 6, 11], [0, 8, 5, 10, 7, 3]]
    # undo
    assert torch.equal(kept.gather(1, perm).gather(1, perm.argsort(1)), kept)
    # raster order leaves ascending positions as they are
    assert restricted_order(torch.arange(12), kept).tolist() == [list(range(6))] * 2


def test_restricted_order_errors():
    with pytest.raises(ValueError, match="permutation"):
        restricted_order(torch.tensor([0, 1, 1, 3]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        restricted_order(torch.arange(4), torch.tensor([[0, 4]]))
