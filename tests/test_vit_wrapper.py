"""Our token path over timm ViTs returns exactly timm's logits, and exposes attention signals on request."""
import pytest
import timm
import torch

import tokenprune
from tokenprune.models import TimmViT
from tokenprune.models.vit import attention_with_signals
from tolerances import fp32_tol


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(reg_tokens=2),
    dict(init_values=1e-2, qk_norm=True),
    dict(class_token=False, global_pool="avg"),
])
def test_unpruned_wrapper_equals_timm(kwargs):
    vit = timm.create_model("deit_test_patch4_32", **kwargs).eval()
    images = torch.randn(3, 3, 32, 32)
    model = tokenprune.create_model(vit)
    with torch.no_grad():
        assert torch.equal(model(images), vit(images))
    assert model.backbone.num_protected == vit.num_prefix_tokens


def test_keep_one_with_a_method_is_bit_identical():
    vit = timm.create_model("deit_test_patch4_32").eval()
    images = torch.randn(2, 3, 32, 32)
    for method in ("evit", "tome", "random", "visionzip"):
        model = tokenprune.create_model(vit, method, keep=1.0)
        with torch.no_grad():
            assert torch.equal(model(images), vit(images)), method


def test_explicit_attention_matches_fused():
    vit = timm.create_model("deit_test_patch4_32").eval()
    blk = vit.blocks[0]
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        ref = blk.attn(blk.norm1(x))
        out, sig = attention_with_signals(blk.attn, blk.norm1(x), {"cls_attn", "keys", "attn_received"}, 0, None)
    torch.testing.assert_close(out, ref, **fp32_tol(ref, terms=65))  # explicit softmax(QK^T)V vs SDPA, 65 keys
    assert sig["cls_attn"].shape == (2, 65)
    torch.testing.assert_close(sig["cls_attn"].sum(-1), torch.ones(2))
    assert sig["keys"].shape == (2, 65, 16)
    torch.testing.assert_close(sig["attn_received"].sum(-1), torch.ones(2))


def test_proportional_attention_with_unit_sizes_is_plain_attention():
    vit = timm.create_model("deit_test_patch4_32").eval()
    blk = vit.blocks[0]
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        ref, _ = attention_with_signals(blk.attn, x, set(), 0, None)
        out, _ = attention_with_signals(blk.attn, x, set(), 0, torch.ones(2, 65))
    torch.testing.assert_close(out, ref)


def test_wrapper_rejects_non_vit():
    with pytest.raises(TypeError, match="VisionTransformer"):
        TimmViT(torch.nn.Linear(2, 2))
