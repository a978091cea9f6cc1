"""PruningClassifier.parameter_groups (timm's param_groups_weight_decay underneath) gives exactly the groups of
the hand-written split it replaced: same two groups, same parameters in the same order, same weight decay."""
import pytest
import torch

from tokenprune.lit import PruningClassifier
from tokenprune.lit.module import NO_DECAY_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_groups(model: torch.nn.Module, weight_decay: float):
    """The hand-written split parameter_groups had before it called timm (the expected result)."""
    decay, no_decay = [], []
    listed = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            listed |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (p.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES or name in listed
                or getattr(p, "_no_weight_decay", False)):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def names_of(module: PruningClassifier, groups):
    names = {id(p): n for n, p in module.model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in groups]


CASES = [  # a ViM, a PlainMamba and a ViT (DeiT) backbone, unpruned and with reduction stages
    ("vim_test_patch4_32", None, 1.0),
    ("vim_test_patch4_32", "top", 0.5),
    ("plainmamba_test_32", None, 1.0),
    ("plainmamba_test_32", "tome", 0.5),
    ("deit_test_patch4_32", None, 1.0),
    ("deit_test_patch4_32", "evit", 0.5),
]


@pytest.mark.parametrize("backbone,method,keep", CASES)
@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_groups_match_the_hand_written_split(backbone, method, keep, weight_decay):
    m = PruningClassifier(backbone, method, keep, weight_decay=weight_decay)
    got = m.parameter_groups()
    assert [set(g) for g in got] == [{"params", "weight_decay"}] * 2
    assert names_of(m, got) == names_of(m, reference_groups(m.model, weight_decay))
    for g, ref in zip(got, reference_groups(m.model, weight_decay)):  # the very tensors, in the same order
        assert len(g["params"]) == len(ref["params"])
        assert all(a is b for a, b in zip(g["params"], ref["params"]))


def test_frozen_parameters_are_left_out():
    m = PruningClassifier("vim_test_patch4_32")
    m.model.backbone.patch_embed.requires_grad_(False)
    got = names_of(m, m.parameter_groups())
    assert got == names_of(m, reference_groups(m.model, 0.05))
    assert not any("patch_embed" in n for names, _ in got for n in names)


def test_concrete_membership():
    vim = PruningClassifier("vim_test_patch4_32")
    (decay, wd), (no_decay, zero) = names_of(vim, vim.parameter_groups())
    assert (wd, zero) == (0.05, 0.0)
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.layers.0.mixer.A_log",
            "backbone.layers.0.mixer.A_b_log", "backbone.layers.1.mixer.D", "backbone.norm_f.weight"} <= set(no_decay)
    assert "backbone.layers.0.mixer.in_proj.weight" in decay
    pm = PruningClassifier("plainmamba_test_32")
    (decay, _), (no_decay, _) = names_of(pm, pm.parameter_groups())
    assert {"backbone.pos_embed", "backbone.layers.0.mamba.A_log", "backbone.layers.0.mamba.D",
            "backbone.layers.0.mamba.direction_Bs"} <= set(no_decay)
    assert not any(n.endswith(".bias") for n in decay)
    vit = PruningClassifier("deit_test_patch4_32")
    (decay, _), (no_decay, _) = names_of(vit, vit.parameter_groups())
    assert {"backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.vit.blocks.0.norm1.weight",
            "backbone.vit.blocks.0.attn.qkv.bias"} <= set(no_decay)
    assert {"backbone.vit.blocks.0.attn.qkv.weight", "backbone.vit.head.weight"} <= set(decay)
