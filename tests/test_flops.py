"""FLOP counting: analytic formulas, published figures, no silently skipped op, FLOPs fall with the budget."""
import math

import pytest
import timm
import torch

import tokenprune
from tokenprune.flops import UncountedOpError, count_flops


def vim_analytic(D, depth, L, N=16, expand=2, patch=16, in_ch=3, classes=1000, directions=2):
    """Full count of one ViM forward at batch 1 (one FMA = one FLOP)."""
    E, R = expand * D, math.ceil(D / 16)
    patches = L - 1
    per_direction = L * E * 4 + L * E * (R + 2 * N) + L * R * E + 9 * L * E * N + L * E
    per_layer = L * D * 2 * E + directions * per_direction + L * E * D
    return patches * D * in_ch * patch * patch + depth * per_layer + D * classes


def test_vim_full_count_equals_the_analytic_formula():
    model = tokenprune.create_model("vim_test_patch4_32")
    report = count_flops(model)
    assert report.total == vim_analytic(D=32, depth=4, L=65, N=4, patch=4, classes=10)
    assert report.paper == vim_analytic(D=32, depth=4, L=65, N=4, patch=4, classes=10, directions=1)
    assert report.by_operator["PythonOp.SelectiveScan"] == 4 * 2 * (9 * 65 * 64 * 4 + 65 * 64)


def test_vit_count_includes_attention_matmuls():
    model = tokenprune.create_model("deit_test_patch4_32")
    D, L, depth = 32, 65, 4
    attn = 2 * L * L * D  # q k^T and attn v over all heads
    per_block = L * D * 3 * D + attn + L * D * D + 2 * L * D * 4 * D + 2 * 5 * L * D  # + 2 affine LayerNorms, 5/elt
    expected = 64 * D * 3 * 16 + depth * per_block + 5 * L * D + D * 10  # patch conv, blocks, final norm, head
    report = count_flops(model)
    assert report.by_operator["scaled_dot_product_attention"] == depth * attn
    assert report.total == expected


@pytest.mark.slow
def test_published_figures_deit_small_and_vim_small():
    deit = count_flops(tokenprune.create_model("deit_small_patch16_224"))
    assert abs(deit.total / 1e9 - 4.6) <= 0.05
    vim = count_flops(tokenprune.create_model("vim_small_patch16_224"))
    assert abs(vim.paper / 1e9 - 5.08) <= 0.05
    assert vim.total == vim_analytic(D=384, depth=24, L=197)


def test_costly_op_without_handle_raises():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.cdist(x.flatten(1), x.flatten(1))

    with pytest.raises(UncountedOpError, match="cdist"):
        count_flops(Odd(), input_size=(3, 8, 8))


@pytest.mark.parametrize("backbone,method", [
    ("vim_test_patch4_32", "hsa"), ("vim_test_patch4_32", "papr_ss"), ("vim_test_patch4_32", "utr"),
    ("deit_test_patch4_32", "evit"), ("deit_test_patch4_32", "tome"), ("deit_test_patch4_32", "visionzip"),
    ("deit_test_patch4_32", "papr"),
])
def test_flops_fall_as_the_budget_falls(backbone, method):
    torch.manual_seed(0)
    base = timm.create_model(backbone)
    proposal = timm.create_model("papr_convnet_micro")
    totals = [count_flops(tokenprune.create_model(base, method, keep=k, proposal=proposal)).total
              for k in (1.0, 0.8, 0.6, 0.5)]
    assert totals[1] > totals[2] > totals[3], totals
    if not method.startswith("papr"):  # on these tiny backbones the proposal ConvNet costs more than it saves
        assert totals[0] > totals[1], totals


def test_proposal_network_is_counted():
    torch.manual_seed(0)
    proposal = timm.create_model("papr_convnet_micro")
    model = tokenprune.create_model("vim_test_patch4_32", "papr", keep=0.6, proposal=proposal)
    report = count_flops(model)
    head = proposal.head.in_features * proposal.head.out_features
    alone = count_flops(proposal, input_size=(3, 32, 32)).total - head  # minus its classifier head
    assert report.by_module["stages.0.evaluator.proposal"] == alone > 0


@pytest.mark.parametrize("with_d,with_z,with_bias", [(False, False, True), (True, False, False),
                                                     (False, True, True), (True, True, True)])
def test_scan_handle_counts_the_d_term_only_when_d_is_given(with_d, with_z, with_bias):
    from tokenprune.ssm import selective_scan

    b, E, N, L = 1, 6, 3, 5

    class Scan(torch.nn.Module):
        def forward(self, x):
            u = x.reshape(b, E, L)
            return selective_scan(u, u, -torch.ones(E, N), torch.ones(b, N, L), torch.ones(b, N, L),
                                  D=torch.ones(E) if with_d else None, z=u if with_z else None,
                                  delta_bias=torch.ones(E) if with_bias else None, delta_softplus=True)

    report = count_flops(Scan(), images=torch.randn(1, E * L))
    assert report.by_operator["PythonOp.SelectiveScan"] == 9 * L * E * N + (L * E if with_d else 0)


def test_matmul_with_a_plain_matrix_counts_every_batch_element():
    class WX(torch.nn.Module):
        def forward(self, x):
            return torch.matmul(torch.ones(4, 6), x.reshape(3, 6, 5))  # (4, 6) @ (3, 6, 5) -> (3, 4, 5)

    report = count_flops(WX(), images=torch.randn(1, 90))
    assert report.total == 3 * 4 * 5 * 6
