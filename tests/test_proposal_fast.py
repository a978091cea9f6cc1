"""The PaPr proposal at its real cost: conv+BN folded gives the same feature maps with fewer modules, the
folded copy follows weight changes, stays out of the state dict, and a lower proposal resolution is an option."""
import pytest
import timm
import torch
from torch import nn

import tokenprune
from tokenprune.models.proposal import fold_batchnorm


def _randomise_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name,size", [("papr_convnet_micro", 32), ("mobilenetv2_100", 64)])
def test_folded_proposal_gives_the_same_features(name, size):
    torch.manual_seed(0)
    net = _randomise_bn(timm.create_model(name))
    fast = fold_batchnorm(net)
    n_bn = lambda m: sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert n_bn(net) > 0 and n_bn(fast) == 0  # every BN of these networks is folded
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        got, want = fast.forward_features(x), net.forward_features(x)
    # fp32 rounding through ~50 layers (ReLU6 clamps make single elements jump): judged on the whole map
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_papr_uses_the_folded_copy_and_follows_weight_changes():
    torch.manual_seed(0)
    proposal = _randomise_bn(timm.create_model("papr_convnet_micro"))
    model = tokenprune.create_model("deit_test_patch4_32", "papr", keep=0.6, proposal=proposal).eval()
    ev = model.stages[0].evaluator
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = ev.fast_proposal()
        assert ev.fast_proposal() is fast  # cached while the weights are unchanged
        torch.testing.assert_close(ev.score_map(x, (8, 8)), _slow_map(proposal, x), rtol=1e-4, atol=1e-5)
        proposal.stem[0].weight.mul_(2)  # e.g. a checkpoint loaded in place
        assert ev.fast_proposal() is not fast
        torch.testing.assert_close(ev.score_map(x, (8, 8)), _slow_map(proposal, x), rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == keys  # the folded copy is no submodule


def _slow_map(proposal, x):
    feats = proposal.forward_features(x).float().mean(1, keepdim=True)
    return torch.nn.functional.interpolate(feats, size=(8, 8), mode="bicubic", align_corners=True)[:, 0]


def test_lower_proposal_resolution():
    torch.manual_seed(0)
    proposal = timm.create_model("papr_convnet_micro").eval()
    seen = []
    proposal.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    model = tokenprune.create_model("deit_test_patch4_32", "papr", keep=0.6, proposal=proposal, proposal_size=16)
    ev = model.stages[0].evaluator
    with torch.no_grad():
        ev.fast_proposal().stem.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen == [(2, 3, 16, 16)]
    with pytest.raises(ValueError, match="proposal_size must be an int >= 8"):
        tokenprune.create_model("deit_test_patch4_32", "papr", keep=0.6, proposal=proposal, proposal_size=2)


def test_a_smaller_proposal_input_costs_fewer_flops():
    from tokenprune import count_flops
    torch.manual_seed(0)
    proposal = timm.create_model("papr_convnet_micro").eval()
    full, small = (count_flops(tokenprune.create_model("deit_test_patch4_32", "papr", keep=0.6, proposal=proposal,
                                                       proposal_size=s)) for s in (None, 16))
    prop_full = full.by_module["stages.0.evaluator.proposal"]
    prop_small = small.by_module["stages.0.evaluator.proposal"]
    assert prop_small < 0.3 * prop_full  # a quarter of the pixels (plus the resize, counted)
    # the antialiased resize 32 -> 16 px: 4 x 4 taps per output value, 3 x 16 x 16 values
    assert small.by_operator["_upsample_bilinear2d_aa"] == 16 * 3 * 16 * 16
