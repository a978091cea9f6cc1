"""Every pure op must run under torch.jit.trace (fvcore traces the whole model to count FLOPs).

Under tracing, ``x.shape[i]`` is a 0-dim tensor rather than an int and in-place scatters of a Python
scalar have no traced op, so each op is traced through a small wrapper module and the traced graph must
give exactly the eager output on the trace inputs.
"""
import warnings

import pytest
import torch

from tokenprune.pruning import ops


class Wrap(torch.nn.Module):
    """forward(*tensors) = fn(*tensors, **kwargs); fn returns a tensor or a tuple of tensors."""

    def __init__(self, fn, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, *tensors):
        return self.fn(*tensors, **self.kwargs)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_traced(fn, *inputs, **kwargs):
    module = Wrap(fn, **kwargs).eval()
    with torch.no_grad():
        eager = _flat(module(*inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: the traced graph is shape-specialised
            traced = torch.jit.trace(module, inputs, check_trace=False)
        got = _flat(traced(*inputs))
    assert len(got) == len(eager)
    for g, e in zip(got, eager):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e)
    return eager


def cls_protected(B, T, at=0):
    p = torch.zeros(B, T, dtype=torch.bool)
    p[:, at] = True
    return p


# --- select -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_order", [True, False])
@pytest.mark.parametrize("with_protected", [True, False])
def test_topk_indices(keep_order, with_protected):
    scores = torch.randn(2, 11)
    if with_protected:
        check_traced(lambda s, p: ops.topk_indices(s, 5, p, keep_order=keep_order), scores, cls_protected(2, 11, 5))
    else:
        check_traced(lambda s: ops.topk_indices(s, 5, keep_order=keep_order), scores)


def test_complement_indices():
    idx = torch.tensor([[0, 3, 4], [1, 2, 6]])
    out = check_traced(lambda i: ops.complement_indices(i, 7), idx)
    assert out[0].tolist() == [[1, 2, 5, 6], [0, 3, 4, 5]]


# --- EViT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_index", [0, 4, None])
@pytest.mark.parametrize("keep_order", [False, True])
def test_evit_reduce(cls_index, keep_order):
    B, T, D = 2, 9, 6
    x, size, attn = torch.randn(B, T, D), torch.rand(B, T) + 0.5, torch.rand(B, T)
    check_traced(lambda x, s, a: ops.evit_reduce(x, s, a, 4, cls_index=cls_index, keep_order=keep_order),
                 x, size, attn)
    check_traced(lambda x, a: ops.evit_reduce(x, None, a, 4, cls_index=cls_index), x, attn)


def test_evit_reduce_keep_all_is_identity():
    x, attn = torch.randn(2, 7, 3), torch.rand(2, 7)
    check_traced(lambda x, a: ops.evit_reduce(x, None, a, 6, cls_index=0), x, attn)


# --- ToMe ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_protected", [True, False])
@pytest.mark.parametrize("T", [10, 11])
def test_bipartite_soft_matching_merge_wavg(with_protected, T):
    B, D = 2, 5
    metric, x, size = torch.randn(B, T, 4), torch.randn(B, T, D), torch.rand(B, T) + 0.5
    prot = cls_protected(B, T, 0) if with_protected else torch.zeros(B, T, dtype=torch.bool)

    def run(metric, x, size, prot):
        merge, unmerge, src = ops.bipartite_soft_matching(metric, 3, prot)
        xm, sm = ops.merge_wavg(merge, x, size)
        xo, so = ops.merge_wavg(merge, x)  # size None: ones
        return xm, sm, xo, so, src, unmerge(xm), merge(x, mode="amax")

    out = check_traced(run, metric, x, size, prot)
    assert out[0].shape == (B, T - 3, D)


def test_bipartite_soft_matching_r_zero():
    metric, x = torch.randn(1, 6, 4), torch.randn(1, 6, 2)

    def run(metric, x):
        merge, _, src = ops.bipartite_soft_matching(metric, 0)
        return ops.merge_wavg(merge, x)[0], src

    check_traced(run, metric, x)


# --- VisionZip ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["add", "mean"])
@pytest.mark.parametrize("cls_index", [0, None])
@pytest.mark.parametrize("contextual", [0, 3])
def test_visionzip_reduce(mode, cls_index, contextual):
    B, T, D = 2, 13, 6
    x, attn, keys, size = torch.randn(B, T, D), torch.rand(B, T), torch.randn(B, T, 4), torch.rand(B, T) + 0.5
    out = check_traced(lambda x, a, k, s: ops.visionzip_reduce(x, a, k, 5, contextual, size=s, cls_index=cls_index,
                                                               mode=mode), x, attn, keys, size)
    assert out[0].shape == (B, 5 + contextual, D)
    check_traced(lambda x, a, k: ops.visionzip_reduce(x, a, k, 5, contextual, cls_index=cls_index, mode=mode),
                 x, attn, keys)


# --- UTR / PuMer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_protected", [True, False])
def test_utr_reduce(prune_fraction, with_protected):
    B, T, D = 2, 12, 5
    x, size, scores, metric = torch.randn(B, T, D), torch.rand(B, T) + 0.5, torch.randn(B, T), torch.randn(B, T, 3)
    if with_protected:
        check_traced(lambda x, s, sc, m, p: ops.utr_reduce(x, s, sc, m, 5, prune_fraction=prune_fraction, protected=p),
                     x, size, scores, metric, cls_protected(B, T, 6))
    else:
        check_traced(lambda x, sc, m: ops.utr_reduce(x, None, sc, m, 5, prune_fraction=prune_fraction),
                     x, scores, metric)


def test_utr_reduce_keep_zero():
    x, scores, metric = torch.randn(1, 6, 3), torch.randn(1, 6), torch.randn(1, 6, 2)
    check_traced(lambda x, sc, m, p: ops.utr_reduce(x, None, sc, m, 0, protected=p), x, scores, metric,
                 cls_protected(1, 6, 2))


@pytest.mark.parametrize("with_protected", [True, False])
def test_pumer_reduce(with_protected):
    B, T, D = 2, 14, 5
    x, size, scores, metric = torch.randn(B, T, D), torch.rand(B, T) + 0.5, torch.randn(B, T), torch.randn(B, T, 3)
    if with_protected:
        check_traced(lambda x, s, sc, m, p: ops.pumer_reduce(x, s, sc, m, 9, 3, protected=p),
                     x, size, scores, metric, cls_protected(B, T, 7))
    else:
        check_traced(lambda x, sc, m: ops.pumer_reduce(x, None, sc, m, 9, 3), x, scores, metric)


# --- smoothing and the grid ---------------------------------------------------------------------------


@pytest.mark.parametrize("border", ["zero", "valid", "replicate"])
@pytest.mark.parametrize("kind", ["mean", "gaussian"])
def test_smooth_scores_with_mask(border, kind):
    scores, mask = torch.randn(2, 4, 5), torch.rand(2, 4, 5) > 0.3
    scores = scores.masked_fill(~mask, float("-inf"))  # absent cells may hold anything
    check_traced(lambda s, m: ops.smooth_scores(s, 3, border=border, mask=m, kind=kind), scores, mask)
    check_traced(lambda s: ops.smooth_scores(s, 3, border=border, kind=kind), torch.randn(2, 4, 5))


def test_scatter_gather_grid():
    H, W = 3, 4
    values = torch.randn(2, 8)
    patch_index = torch.tensor([[-1, 0, 2, 3, 5, 7, 10, 11], [4, -1, 1, 2, 3, 6, 8, 9]])

    def run(v, pi):
        grid_vals, present = ops.scatter_to_grid(v, pi, (H, W))
        smoothed = ops.smooth_scores(grid_vals, 3, mask=present)
        return grid_vals, present, ops.gather_from_grid(smoothed, pi), ops.gather_from_grid(grid_vals, pi, fill=0.0)

    out = check_traced(run, values, patch_index)
    assert int(out[1].sum()) == 14


# --- hidden-state alignment ---------------------------------------------------------------------------


def test_alignment_ops():
    pos = torch.tensor([[0, 2, 3, 7], [1, 4, 5, 6]])
    x, y = torch.randn(2, 4, 3), torch.randn(2, 9, 3)
    delta, Bm = torch.rand(2, 5, 4), torch.randn(2, 6, 4)
    order = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0])

    def run(pos, x, y, delta, Bm, order):
        gap_f, gap_b = ops.scan_gaps(pos, 9)
        d, b = ops.gap_scaled_delta_B(delta, Bm, gap_f)
        return (gap_f, gap_b, d, b, ops.scatter_to_sequence(x, pos, 9), ops.gather_from_sequence(y, pos),
                ops.restricted_order(order, pos))

    check_traced(run, pos, x, y, delta, Bm, order)
