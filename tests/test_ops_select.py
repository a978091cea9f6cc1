"""Top-k with protected tokens, complements and budget arithmetic."""
import pytest
import torch

from tokenprune.pruning.ops import complement_indices, keep_count, keep_count_ceil, keep_count_even, topk_indices

SCORES = torch.tensor([[0.3, 0.9, 0.1, 0.7, 0.5, 0.8],
                       [0.6, 0.2, 0.4, 0.4, 0.9, 0.0]])


def test_topk_exact_indices_ascending():
    idx = topk_indices(SCORES, 3)
    assert idx.dtype == torch.long
    assert idx.tolist() == [[1, 3, 5], [0, 2, 4]]  # row 1: tie 0.4/0.4 -> lower index 2 wins


def test_topk_score_order():
    assert topk_indices(SCORES, 3, keep_order=False).tolist() == [[1, 5, 3], [4, 0, 2]]


def test_topk_ties_lower_index_first():
    s = torch.zeros(1, 6)
    assert topk_indices(s, 2).tolist() == [[0, 1]]
    assert topk_indices(s, 2, keep_order=False).tolist() == [[0, 1]]


def test_protected_always_kept():
    prot = torch.tensor([[False, False, True, False, False, False],
                         [False, False, False, False, False, True]])
    idx = topk_indices(SCORES, 2, protected=prot)
    assert idx.tolist() == [[1, 2, 5], [0, 4, 5]]
    idx = topk_indices(SCORES, 2, protected=prot, keep_order=False)
    assert idx.tolist() == [[2, 1, 5], [5, 4, 0]]  # protected first, then by descending score
    assert topk_indices(SCORES, 0, protected=prot).tolist() == [[2], [5]]


def test_protected_with_minus_inf_scores_still_kept():
    s = torch.tensor([[float("-inf"), 1.0, float("-inf"), 2.0]])
    prot = torch.tensor([[False, False, True, False]])
    assert topk_indices(s, 3, protected=prot).tolist() == [[0, 1, 2, 3]]
    assert topk_indices(s, 2, protected=prot).tolist() == [[1, 2, 3]]


def test_topk_errors():
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 6\].*got 7"):
        topk_indices(SCORES, 7)
    prot = torch.zeros(2, 6, dtype=torch.bool)
    prot[0, 0] = True
    with pytest.raises(ValueError, match=r"same number of protected.*\[1, 0\]"):
        topk_indices(SCORES, 2, protected=prot)
    prot[1, 0] = True
    with pytest.raises(ValueError, match=r"\[0, 5\].*1 protected.*got 6"):
        topk_indices(SCORES, 6, protected=prot)
    with pytest.raises(ValueError, match="bool"):
        topk_indices(SCORES, 2, protected=prot.float())


def test_complement():
    idx = torch.tensor([[5, 1, 3], [0, 2, 4]])
    assert complement_indices(idx, 6).tolist() == [[0, 2, 4], [1, 3, 5]]
    assert complement_indices(torch.zeros(2, 0, dtype=torch.long), 3).tolist() == [[0, 1, 2]] * 2
    with pytest.raises(ValueError, match="repeated"):
        complement_indices(torch.tensor([[1, 1]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        complement_indices(torch.tensor([[4]]), 4)


def test_keep_count():
    assert keep_count(196, 0.8) == 157  # 156.8
    assert keep_count(196, 0.6) == 118  # 117.6
    assert keep_count(5, 0.5) == 3  # halves round up
    assert keep_count(10, 0.7) == 7
    assert keep_count(10, 0.01) == 1  # clamped to >= 1
    assert keep_count(10, 1.0) == 10


def test_keep_count_even_is_the_official_top_rule():
    assert [keep_count_even(n, 0.8) for n in (196, 156, 124)] == [156, 124, 100]  # ceil 157 -> 156; 100 stays
    assert keep_count_even(49, 0.7) == 34  # ceil(34.3) = 35 -> 34
    assert keep_count_even(3, 0.1) == 1  # never below one token
    assert keep_count_even(7, 0.99) == 6
    assert keep_count_even(7, 1.0) == 7  # keep 1 is the unpruned model


def test_top_on_vim_small_gives_the_published_token_sequence():
    """ToP on ViM-S, keep 0.8 after layers 5, 10, 15: 197 -> 157 -> 125 -> 101 tokens (ToP paper / code)."""
    import tokenprune
    model = tokenprune.create_model("vim_small_patch16_224", "top", keep=0.8)
    assert [s.layer for s in model.stages] == [4, 9, 14]
    n, seq = 197, []
    for stage in model.stages:
        n = stage.out_tokens(n, 1)
        seq.append(n)
    assert seq == [157, 125, 101]


def test_keep_count_ceil_evit_schedule():
    # DeiT-S at keep 0.7: 196 -> 138 (+fused) -> 98 (+fused) -> 70 (+fused); N - 1 counts the fused token.
    n = 196
    seq = []
    for _ in range(3):
        n = keep_count_ceil(n, 0.7)
        seq.append(n)
        n += 1  # the fused token is a non-CLS token at the next reduction
    assert seq == [138, 98, 70]
    assert keep_count_ceil(100, 0.55) == 55  # no float artefact (0.55 * 100 = 55.00000000000001)
    assert keep_count_ceil(10, 0.3) == 3


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_keep_ratio_errors(bad):
    with pytest.raises(ValueError, match="keep ratio must be in \\(0, 1\\]"):
        keep_count(10, bad)
    with pytest.raises(ValueError, match="keep ratio"):
        keep_count_ceil(10, bad)


def test_keep_count_n_errors():
    with pytest.raises(ValueError, match="n_tokens"):
        keep_count(0, 0.5)
