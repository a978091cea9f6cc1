"""Budget solver: one-step methods exact, multi-stage within one token per block, monotone, FLOPs targets."""
import pytest
import timm
import torch

import tokenprune
from tokenprune.evaluate import measured_token_reduction, solve_keep, solve_keep_for_flops
from tokenprune.flops import count_flops
from tokenprune.pruning.methods import as_backbone

TARGETS = (0.2, 0.3, 0.4, 0.5)


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {"vim": as_backbone(timm.create_model("vim_test_patch4_32")).eval(),
            "deit": as_backbone(timm.create_model("deit_test_patch4_32")).eval()}


@pytest.mark.parametrize("family", ["vim", "deit"])
@pytest.mark.parametrize("method", ["random", "l2", "papr", "papr_ss"])
def test_one_step_methods_keep_exactly_one_minus_target(backbones, family, method):
    for t in TARGETS:
        assert solve_keep(backbones[family], method, t) == pytest.approx(1.0 - t, abs=1e-12)


MULTI = [("vim", m) for m in ("top", "hsa", "evit", "tome", "utr", "pumer")] + \
        [("deit", m) for m in ("evit", "tome", "visionzip", "pumer", "utr")]


@pytest.mark.parametrize("family,method", MULTI, ids=[f"{f}-{m}" for f, m in MULTI])
def test_multi_stage_within_one_token_of_target(backbones, family, method):
    bb = backbones[family]
    for t in TARGETS:
        keep = solve_keep(bb, method, t)
        assert 0.0 < keep < 1.0
        model = tokenprune.create_model(bb, method, keep=keep)
        # tokens summed over blocks within one token per block of the target
        assert abs(model.token_reduction() - t) * bb.seq_len <= 1.0, (t, keep, model.tokens_per_block())


@pytest.mark.filterwarnings("ignore:.*closest reachable")
@pytest.mark.parametrize("family,method", [("vim", "top"), ("vim", "tome"), ("deit", "evit"), ("deit", "visionzip")])
def test_solver_is_monotone(backbones, family, method):
    bb = backbones[family]
    targets = [0.05 * i for i in range(1, 13)]
    keeps = [solve_keep(bb, method, t) for t in targets]
    reductions = [tokenprune.create_model(bb, method, keep=k).token_reduction() for k in keeps]
    assert all(a >= b for a, b in zip(keeps, keeps[1:])), keeps
    assert all(a <= b + 1e-12 for a, b in zip(reductions, reductions[1:])), reductions


def test_short_keep_and_edge_cases(backbones):
    bb = backbones["vim"]
    assert solve_keep(bb, "top", 0.0) == 1.0
    keep = solve_keep(bb, "top", 0.4)
    assert len(repr(keep)) <= 6  # a short decimal inside the solved step, not a bisection residue
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        solve_keep(bb, "top", 1.0)
    with pytest.raises(ValueError, match="unknown method"):
        solve_keep(bb, "nope", 0.3)
    # a name works too (the backbone is built, random weights: nothing but the structure is used)
    assert solve_keep("deit_test_patch4_32", "evit", 0.3) == solve_keep(backbones["deit"], "evit", 0.3)


def test_first_step_below_keep_one_is_not_rounded_up_to_no_pruning():
    """7x7 grid + CLS, ToP's even token counts: the smallest step drops one token and ends just under keep 1.
    The solver must return a keep inside that step, not 1.0 (which prunes nothing)."""
    bb = as_backbone(timm.create_model("vim_micro_patch8_56"))
    keep = solve_keep(bb, "top", 0.015)
    assert keep < 1.0
    model = tokenprune.create_model(bb, "top", keep=keep)
    assert model.token_reduction() == pytest.approx(0.015)
    assert min(model.tokens_per_block()) == bb.seq_len - 1


def test_unreachable_target_warns_and_gives_the_closest(backbones):
    bb = backbones["vim"]  # ToMe merges at most half the tokens of a block: 4 blocks cannot lose 60 %
    with pytest.warns(UserWarning, match="closest reachable"):
        keep = solve_keep(bb, "tome", 0.6)
    best = max(tokenprune.create_model(bb, "tome", keep=k / 100).token_reduction() for k in range(1, 100))
    assert tokenprune.create_model(bb, "tome", keep=keep).token_reduction() == pytest.approx(best)


def test_layers_option_changes_the_schedule(backbones):
    bb = backbones["vim"]
    keep = solve_keep(bb, "top", 0.3, layers=[0])  # one stage after block 0 of 4: 3/4 of the blocks see it
    model = tokenprune.create_model(bb, "top", keep=keep, layers=[0])
    assert abs(model.token_reduction() - 0.3) * bb.seq_len <= 1.0
    assert keep != solve_keep(bb, "top", 0.3)
    # a one-step schedule through `layers` is exact too
    assert solve_keep(bb, "l2", 0.3, layers=[-1]) == pytest.approx(0.7)


def test_measured_reduction_matches_the_simulation(backbones):
    for family, method in [("vim", "top"), ("deit", "tome"), ("deit", "evit")]:
        bb = backbones[family]
        model = tokenprune.create_model(bb, method, keep=solve_keep(bb, method, 0.4)).eval()
        assert measured_token_reduction(model) is None  # nothing run yet
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        assert measured_token_reduction(model) == pytest.approx(model.token_reduction())
    unpruned = tokenprune.create_model(backbones["deit"])
    assert measured_token_reduction(unpruned) == 0.0


def test_flops_target(backbones):
    bb = backbones["vim"]
    base = count_flops(tokenprune.create_model(bb)).total
    keep = solve_keep_for_flops(bb, "top", 0.7, unpruned_flops=base)
    ratio = count_flops(tokenprune.create_model(bb, "top", keep=keep)).total / base
    assert abs(ratio - 0.7) < 0.03, (keep, ratio)
    assert solve_keep_for_flops(bb, "top", 1.0) == 1.0
