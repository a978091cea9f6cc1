"""Every preset on a small ViM and a small DeiT at several budgets: exact token counts, protected tokens,
scan order, sizes, bit-identity at keep 1.0, and clear errors for combinations that make no sense."""
import math

import pytest
import timm
import torch

import tokenprune
from tokenprune.pruning import BEFORE_ENCODER, METHODS

BACKBONES = {"vim": "vim_test_patch4_32", "deit": "deit_test_patch4_32"}
KEEPS = (1.0, 0.8, 0.6, 0.5)
MERGING = {"tome", "visionzip", "evit"}  # every original patch is accounted for in some token's size


def applicable(method, family):
    fam = "ssm" if family == "vim" else "vit"
    return fam in METHODS[method].families


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {k: timm.create_model(v).eval() for k, v in BACKBONES.items()}


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(2, 3, 32, 32)


def expected_counts(method, family, keep, depth=4):
    """Hand-written token counts per stage for the 8x8-grid test backbones (64 patches + 1 CLS)."""
    n = 64
    spec = METHODS[method]
    if spec.schedule == "embed":
        return [1 + int(math.floor(keep * n + 0.5))]
    if spec.schedule == "every":  # ToMe: r = free - round(keep*free), at most |A| - 1 (CLS in A)
        counts, t = [], n + 1
        for _ in range(depth):
            free = t - 1
            r = min(free - max(1, int(math.floor(keep * free + 0.5))), (t + 1) // 2 - 1)
            t -= r
            counts.append(t)
        return counts
    stages = 1 if spec.schedule == "quarter" else (3 if family == "deit" else 2)
    counts, free = [], n
    for _ in range(stages):
        if method == "evit":
            kept = math.ceil(keep * free - 1e-9)
        elif method in ("top", "hsa"):  # the official ToP count: ceil, lowered to even
            kept = free if keep == 1.0 else max(1, math.ceil(keep * free - 1e-9) // 2 * 2)
        else:
            kept = int(math.floor(keep * free + 0.5))
        free = kept + (1 if method == "evit" else 0)
        counts.append(1 + free)
    return counts


CASES = [(m, f, k) for m in sorted(METHODS) for f in BACKBONES for k in KEEPS if applicable(m, f)]


@pytest.mark.parametrize("method,family,keep", CASES, ids=[f"{m}-{f}-{k}" for m, f, k in CASES])
def test_method_on_backbone(method, family, keep, backbones, proposal, images):
    base = backbones[family]
    model = tokenprune.create_model(base, method, keep=keep, proposal=proposal).eval()
    with torch.no_grad():
        logits = model(images)
        reference = tokenprune.create_model(base)(images)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    if keep == 1.0:
        assert torch.equal(logits, reference) and model.token_trace == []
        return
    trace = model.token_trace
    assert [t.tokens_out for t in trace] == expected_counts(method, family, keep)
    simulated = model.tokens_per_block()
    for t in trace:
        if t.layer == BEFORE_ENCODER:
            block = 0
        else:  # ViT reduces inside block i (its MLP sees the result), SSMs after block i
            block = t.layer if model.backbone.reduction_point == "mid" else t.layer + 1
        if block < len(simulated):
            assert simulated[block] == t.tokens_out, (method, t.layer, simulated)
        # the CLS is never dropped, and sits where the backbone expects it
        assert int(t.protected.sum(1).min()) == 1
        cls_pos = 32 if family == "vim" else 0
        assert bool((t.pos[:, t.cls_index] == cls_pos).all())
        if family == "vim":  # middle CLS and scan order of the patch tokens preserved
            assert t.cls_index == (t.tokens_out - 1) // 2
            patch_pos = t.pos[:, [i for i in range(t.tokens_out) if i != t.cls_index]]
            for row in patch_pos:  # fused extras (pos -1) may differ per image; they sit at the end
                ordered = row[row >= 0]
                assert bool((ordered[1:] > ordered[:-1]).all())
                assert bool((row[len(ordered):] == -1).all())
        if method in MERGING:
            torch.testing.assert_close(t.size.sum(1), torch.full((2,), 65.0))
        else:
            assert bool((t.size >= 1).all())


def test_keep_one_equals_unpruned_for_every_method(backbones, proposal, images):
    for family, base in backbones.items():
        with torch.no_grad():
            ref = base(images)
            for method in METHODS:
                if applicable(method, family):
                    out = tokenprune.create_model(base, method, keep=1.0, proposal=proposal)(images)
                    assert torch.equal(out, ref), (family, method)


@pytest.mark.parametrize("method,family,match", [
    ("visionzip", "vim", "defined for"),
    ("top", "deit", "defined for"),
    ("hsa", "deit", "defined for"),
    ("nonsense", "deit", "unknown method 'nonsense'"),
])
def test_nonsense_combinations_fail_clearly(method, family, match, backbones):
    with pytest.raises(ValueError, match=match):
        tokenprune.create_model(backbones[family], method, keep=0.5)


def test_other_clear_errors(backbones):
    vim, deit = backbones["vim"], backbones["deit"]
    with pytest.raises(ValueError, match=r"keep ratio must be in \(0, 1\], got 1.5"):
        tokenprune.create_model(deit, "random", keep=1.5)
    with pytest.raises(ValueError, match="keep ratio must be in"):
        tokenprune.create_model(deit, "random", keep=0.0)
    with pytest.raises(ValueError, match="cannot give"):
        tokenprune.create_model(vim, "random", keep=0.5, evaluator="cls_attn", layers=[1])
    with pytest.raises(ValueError, match="alignment"):
        tokenprune.create_model(deit, "random", keep=0.5, alignment="gap")
    with pytest.raises(ValueError, match="needs a proposal ConvNet"):
        tokenprune.create_model(vim, "papr", keep=0.5)
    with pytest.raises(ValueError, match="out of range"):
        tokenprune.create_model(vim, "top", keep=0.5, layers=[7])
    with pytest.raises(ValueError, match="unknown backbone 'vim_huge'"):
        tokenprune.create_model("vim_huge", "top", keep=0.5)
    with pytest.raises(ValueError, match="odd integer"):
        tokenprune.create_model(vim, "papr_ss", keep=0.5, smoothing=4, proposal=timm.create_model("papr_convnet_micro"))


def test_hsa_alignment_variants_differ_from_plain_pruning(backbones, images):
    vim = backbones["vim"]
    with torch.no_grad():
        plain = tokenprune.create_model(vim, "top", keep=0.5)(images)
        gap = tokenprune.create_model(vim, "hsa", keep=0.5)(images)
        mask = tokenprune.create_model(vim, "hsa", keep=0.5, alignment="mask")(images)
    assert not torch.allclose(plain, gap) and not torch.allclose(plain, mask)


def test_list_methods_has_every_paper_preset():
    assert set(tokenprune.list_methods()) >= {"random", "l2", "evit", "tome", "pumer", "utr", "top", "hsa",
                                              "papr", "papr_ss", "visionzip"}


def test_top_with_the_ungated_score_keeps_what_that_score_ranks_highest(backbones, images):
    """The ablation evaluator (ToP's score before the silu(z) gate) runs on ToP's schedule, keeps the highest-
    scoring patches, and is refused where there is no SSM."""
    vim = backbones["vim"]
    with torch.no_grad():
        gated = tokenprune.create_model(vim, "top", keep=0.5)
        ungated = tokenprune.create_model(vim, "top", keep=0.5, evaluator="ssm_out_ungated")
        assert [s.layer for s in ungated.stages] == [s.layer for s in gated.stages]
        assert not torch.allclose(gated(images), ungated(images))
        first = ungated.stages[0].layer
        state = vim.embed(images)
        seen = {}

        class Hook:
            needs = {"ssm_out_ungated"}

            def __call__(self, state, signals):
                seen.update(signals)
                return state

        for i in range(first + 1):
            state = vim.run_block(i, state, Hook() if i == first else None)
        out = ungated.stages[0](state, seen)
    kept = out.pos
    score = seen["ssm_out_ungated"].clone()
    score[:, state.cls_index] = float("inf")  # CLS is always kept
    n = kept.shape[1]
    expected = state.pos.gather(1, score.topk(n, dim=1).indices)
    # the same tokens (where CLS lands is the scan-order rule's business: checked separately)
    assert torch.equal(kept.sort(dim=1).values, expected.sort(dim=1).values)
    cls_pos = state.pos[:, state.cls_index]
    assert out.cls_index == n // 2 and torch.equal(kept[:, out.cls_index], cls_pos)
    patches = torch.cat([kept[:, :out.cls_index], kept[:, out.cls_index + 1:]], dim=1)
    assert torch.equal(patches, patches.sort(dim=1).values)  # patches stay in scan order
    with pytest.raises(ValueError, match="ssm_out_ungated"):
        tokenprune.create_model(backbones["deit"], "random", keep=0.5, evaluator="ssm_out_ungated", layers=[1])
