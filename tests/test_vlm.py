"""Visual-token reduction in Hugging Face LLaVA-1.5 / LLaVA-NeXT (small random configs, the real token geometry).

The models are saved with save_pretrained and loaded back with from_pretrained(PATH), as official weights are.
"""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import (LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration,  # noqa: E402
                          LlavaNextForConditionalGeneration)

from tokenprune.pruning import ops  # noqa: E402
from tokenprune.vlm import attach, load  # noqa: E402
from tokenprune.vlm.configs import SMALL_IMAGE_TOKEN as IMG, llava15_config, llava_next_config  # noqa: E402
from tokenprune.vlm.cost import kv_cache_bytes, prefill_flops, vision_flops  # noqa: E402
from tokenprune.vlm.placeholders import fit_placeholders  # noqa: E402
from tolerances import fp32_tol  # noqa: E402

METHODS = ("visionzip", "cls_attn", "l2", "random", "tome")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only add contention
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMG])  # a random LM may emit <image>


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava15")
    LlavaForConditionalGeneration(llava15_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llava(llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("llava_next")
    LlavaNextForConditionalGeneration(llava_next_config()).save_pretrained(path)
    return LlavaNextForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()


def prompt(before=(1, 5, 6), after=(7, 8, 9), n_img=576):
    return torch.tensor([list(before) + [IMG] * n_img + list(after)])


def pixels(n=1, seed=0):
    return torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


def llm_inputs(model):
    """Capture what the language model gets (inputs_embeds) in the next forward."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].detach()), with_kwargs=True)
    return seen, handle


def test_load_from_local_directory(llava_dir, llava):
    reduced = load(llava_dir, "visionzip", 64)
    ids, pv = prompt(), pixels()
    with torch.no_grad():
        ours = reduced(ids, pv).logits
        ref = attach(llava, "visionzip", 64)(ids, pv).logits
    assert reduced.budget == 64 and torch.equal(ours, ref)


def test_full_budget_is_the_unmodified_model(llava):
    ids, pv = prompt(), pixels()
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pv).logits
        for method in METHODS:  # every method passes the unreduced tokens through our own merge path
            assert torch.equal(attach(llava, method, 576)(ids, pv).logits, ref), method
    reduced = attach(llava, "visionzip", 576)
    assert torch.equal(reduced.generate(ids, pv, **GEN), llava.generate(input_ids=ids, pixel_values=pv, **GEN))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [192, 64, 1])
def test_llm_sees_the_budget_and_text_untouched(llava, method, budget):
    if method == "visionzip" and budget == 1:
        budget = 2  # one dominant (the CLS) + one contextual
    before, after = (1, 5, 6), (7, 8, 9, 10)
    ids, pv = prompt(before, after), pixels()
    reduced = attach(llava, method, budget)
    seen, handle = llm_inputs(llava)
    try:
        with torch.no_grad():
            reduced(ids, pv)
    finally:
        handle.remove()
    emb = seen[0][0]
    assert emb.shape[0] == len(before) + budget + len(after)
    text_emb = llava.get_input_embeddings()(torch.tensor(before + after))
    # the text tokens, in order, at their places: before the image unmoved, after it shifted by the removed count
    assert torch.equal(emb[:len(before)], text_emb[:len(before)])
    assert torch.equal(emb[len(before) + budget:], text_emb[len(before):])
    feats = reduced.encode_images(pv)
    assert feats[0].shape[0] == budget and torch.equal(emb[len(before):len(before) + budget], feats[0])
    kept = reduced.last_kept[0]
    assert kept.shape == (1, budget) and int(kept.max()) < 576
    if method != "visionzip":
        assert bool((kept[0, 1:] > kept[0, :-1]).all())  # original order, all distinct patches


def test_visionzip_features_match_the_algorithm_on_eager_attention(llava):
    """Our CLS row (from q/k hooks) and layer indexing against the tower's own eager attention weights."""
    pv, layer = pixels(2, seed=3), -2
    tower = llava.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pv, output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    hidden = out.hidden_states[layer]  # output of layers[-2]
    attn = out.attentions[layer]  # attention inside layers[-2]: (B, heads, T, T)
    blk = tower.encoder.layers[layer]
    with torch.no_grad():
        k = blk.self_attn.k_proj(blk.layer_norm1(out.hidden_states[layer - 1]))
        keys = k.view(2, 577, 2, -1).mean(2)
        x, _, _ = ops.visionzip_reduce(hidden, attn[:, :, 0].sum(1), keys, dominant=54, contextual=10)
        ref = llava.model.multi_modal_projector(x)
        ours = torch.stack(attach(llava, "visionzip", 64).encode_images(pv))
    # SDPA vs eager attention in the tower: fp32 rounding over 577 keys in the 2 layers before the feature layer
    torch.testing.assert_close(ours, ref, **fp32_tol(ref, terms=2 * 577))


def test_visionzip_budgets_split_as_the_paper(llava):
    for budget, dominant, contextual in [(64, 54, 10), (128, 108, 20), (192, 162, 30)]:
        spec = attach(llava, "visionzip", budget).spec
        assert (spec.budget - spec.contextual, spec.contextual) == (dominant, contextual)
    assert attach(llava, "visionzip", dominant=20, contextual=4).budget == 24


def test_batched_generation_with_different_prompts(llava):
    rows = [prompt((1, 5, 6), (7, 8, 9, 10, 11)), prompt((1, 12), (13,))]
    pv = pixels(2, seed=5)
    reduced = attach(llava, "visionzip", 64)
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as for generation
        ids[i, width - r.shape[1]:], mask[i, width - r.shape[1]:] = r[0], 1
    batch = reduced.generate(ids, pv, mask, **GEN)
    for i, r in enumerate(rows):
        alone = reduced.generate(r, pv[i:i + 1], **GEN)
        assert torch.equal(batch[i, -GEN["max_new_tokens"]:], alone[0, -GEN["max_new_tokens"]:])
    prepared = reduced.prepare(ids, pv, mask)
    assert (prepared["input_ids"] == IMG).sum(1).tolist() == [64, 64]
    assert prepared["attention_mask"].sum(1).tolist() == [64 + 8, 64 + 3]


@pytest.mark.parametrize("method", ["visionzip", "tome"])
def test_generation_with_kv_cache_equals_without(llava, method):
    ids, pv = prompt(), pixels(seed=7)
    reduced = attach(llava, method, 64)
    with_cache = reduced.generate(ids, pv, use_cache=True, **GEN)
    without = reduced.generate(ids, pv, use_cache=False, **GEN)
    assert with_cache.shape[1] == 3 + 64 + 3 + GEN["max_new_tokens"]
    assert torch.equal(with_cache, without)


def _next_inputs(model, sizes, seed=0):
    """Prompts with the unreduced placeholder counts of LLaVA-NeXT (what its processor makes), left padded."""
    pv = torch.randn(len(sizes), 5, 3, 336, 336, generator=torch.Generator().manual_seed(seed))
    sizes = torch.tensor(sizes)
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pv, sizes).pooler_output]
    rows = [[1, 5] + [IMG] * n + [7, 8] for n in counts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, pv, mask, sizes


def test_next_full_budget_is_the_unmodified_model(llava_next):
    ids, pv, mask, sizes = _next_inputs(llava_next, [[336, 500], [336, 336]])  # 3 tiles each, unpadded differently
    reduced = attach(llava_next, "visionzip", 576)
    with torch.no_grad():
        ref = llava_next(input_ids=ids, pixel_values=pv, attention_mask=mask, image_sizes=sizes).logits
        assert torch.equal(reduced(ids, pv, mask, sizes).logits, ref)
    ref_gen = llava_next.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, image_sizes=sizes, **GEN)
    assert torch.equal(reduced.generate(ids, pv, mask, sizes, **GEN), ref_gen)


@pytest.mark.parametrize("method", ["visionzip", "l2"])
def test_next_budget_per_tile_and_newlines(llava_next, method):
    budget = 32
    ids, pv, mask, sizes = _next_inputs(llava_next, [[500, 700], [336, 1000]], seed=2)
    reduced = attach(llava_next, method, budget)
    feats = reduced.encode_images(pv, sizes)
    newline = llava_next.model.image_newline
    for f, kept, size in zip(feats, reduced.last_kept, sizes):
        tiles = kept.shape[0]
        rows = (f.shape[0] - budget * tiles)
        assert kept.shape == (tiles, budget) and tiles > 1 and rows >= 1
        # base tile, then each row of tiles closed by one newline
        per_row = budget * (tiles - 1) // rows
        ends = [budget + (r + 1) * (per_row + 1) - 1 for r in range(rows)]
        assert ends[-1] == f.shape[0] - 1
        is_newline = (f == newline).all(-1)
        assert is_newline.nonzero().flatten().tolist() == ends
    assert reduced.image_token_counts(sizes.tolist()) == [f.shape[0] for f in feats]
    seen, handle = llm_inputs(llava_next)
    try:
        with torch.no_grad():
            reduced(ids, pv, mask, sizes)
    finally:
        handle.remove()
    assert seen[0].shape[1] == 4 + max(f.shape[0] for f in feats)
    out = reduced.generate(ids, pv, mask, sizes, **GEN)
    assert torch.equal(out, reduced.generate(ids, pv, mask, sizes, use_cache=False, **GEN))


def test_bad_input_errors_name_the_value(llava):
    with pytest.raises(ValueError, match="budget 577 .* 576"):
        attach(llava, "visionzip", 577)
    with pytest.raises(ValueError, match="dominant = budget - contextual = 10 - 10 = 0"):
        attach(llava, "visionzip", 10, contextual=10)
    with pytest.raises(ValueError, match="dominant must be an int >= 1.*got 0"):
        attach(llava, "visionzip", dominant=0, contextual=5)
    with pytest.raises(ValueError, match="unknown visual-token method 'evit'"):
        attach(llava, "evit", 64)
    with pytest.raises(ValueError, match="budget must be an int >= 1.*got 0"):
        attach(llava, "l2", 0)
    with pytest.raises(ValueError, match="method 'l2' takes a budget only"):
        attach(llava, "l2", 64, contextual=10)
    text = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=32))
    with pytest.raises(TypeError, match="unsupported model class LlamaForCausalLM"):
        attach(text, "visionzip", 64)
    for layer in (-4, 0, 4):  # a 3-layer tower: -3..-1 and 1..3 are layer outputs
        cfg = llava15_config()
        cfg.vision_feature_layer = layer
        model = LlavaForConditionalGeneration(cfg)
        with pytest.raises(ValueError, match=f"vision_feature_layer {layer} is out of range"):
            attach(model, "visionzip", 64)


def test_placeholder_runs_must_match_the_images():
    ids = torch.tensor([[1, IMG, IMG, 5, IMG, 6]])
    with pytest.raises(ValueError, match="more <image> placeholder runs than the 1 images"):
        fit_placeholders(ids, [1], IMG)
    with pytest.raises(ValueError, match="2 <image> placeholder runs for 3 images"):
        fit_placeholders(ids, [1, 1, 1], IMG)
    out, mask = fit_placeholders(ids, [3, 1], IMG)
    assert out.tolist() == [[1, IMG, IMG, IMG, 5, IMG, 6]] and mask.sum() == 7


def test_cost_formulas():
    real = llava15_config(real=True)
    # CLIP ViT-L/14 at 336 px: ~191 G multiply-adds (the published fvcore count is 190.7 G)
    assert abs(vision_flops(real) / 1e9 - 190.7) < 2
    full, reduced = prefill_flops(real, 576, 32), prefill_flops(real, 64, 32)
    assert 0.15 < reduced["llm"] / full["llm"] < 0.17  # ~linear in the sequence: 96 / 608 plus attention
    assert kv_cache_bytes(real, 608) == 2 * 32 * 608 * 4096 * 2  # 304 MiB in bf16


def test_benchmark_model_without_init_on_the_device():
    """The --real-shapes path (no transformers init, N(0, 0.02) filled on the device), on the small config."""
    from tokenprune.vlm.bench import build_model, prompt_inputs

    model = build_model(real=False, dtype=torch.bfloat16, skip_init=True)
    params = torch.cat([p.float().flatten() for p in model.parameters()])
    assert model.dtype == torch.bfloat16 and bool(params.isfinite().all()) and abs(params.std() - 0.02) < 2e-3
    with torch.no_grad():
        out = attach(model, "visionzip", 64)(**prompt_inputs(model, 8), logits_to_keep=1)
    assert out.logits.shape == (1, 1, 160) and bool(out.logits.isfinite().all())


def test_benchmark_rows(llava):
    from tokenprune.vlm.bench import markdown_table, measure

    rows = measure(llava, [576, 64], "visionzip", n_text=8, warmup=0, iters=1)
    assert [r["visual_tokens"] for r in rows] == [576, 64]
    assert all(r["kv_bytes"] == r["kv_bytes_analytic"] for r in rows)  # the cache holds exactly the tokens fed
    assert rows[1]["flops"] < rows[0]["flops"]
    assert "| 64 | 64 | 72 |" in markdown_table(rows)
    assert rows[1]["aten_ops"] > rows[0]["aten_ops"]  # the reduction adds ops; the LLM runs the same ones


def test_full_select_strategy_feeds_and_protects_the_cls(llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True).eval()
    model.config.vision_feature_select_strategy = "full"  # 577 tokens: the CLS is fed too
    ids, pv = prompt(n_img=577), pixels()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv).logits
        assert torch.equal(attach(model, "l2", 577)(ids, pv).logits, ref)
    with pytest.raises(ValueError, match="budget 578 .* 577"):
        attach(model, "l2", 578)
    for method in METHODS:
        reduced = attach(model, method, 16)
        assert reduced.encode_images(pv)[0].shape[0] == 16
        assert int(reduced.last_kept[0][0, 0]) == -1, method  # the CLS first, never dropped or merged


def test_report_cli(tmp_path):
    pytest.importorskip("skimage")
    from tokenprune.vlm.report import main

    path = main(["--out", str(tmp_path), "--methods", "[visionzip, tome]", "--budgets", "[576, 64]",
                 "--warmup", "0", "--iters", "1", "--prompt_tokens", "8"])
    text = open(path).read()
    assert "| 64 | 64 | 72 |" in text and "vlm_kept_patches.png" in text
    assert (tmp_path / "vlm_kept_patches.png").stat().st_size > 10_000


def test_projector_finetune_lowers_the_caption_loss_and_trains_the_projector_only(llava_dir):
    pytest.importorskip("skimage")
    from torch.utils.data import DataLoader

    from tokenprune.vlm.finetune import (CaptionSet, CharTokenizer, ProjectorFinetune, caption_labels, collate,
                                         finetune)

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True).eval()
    reduced = attach(model, "visionzip", 64)
    tok = CharTokenizer(160, reserved=[IMG])
    ids = collate(IMG, 576)([(torch.zeros(3, 336, 336), torch.tensor(tok("ab")))])["input_ids"]
    assert caption_labels(ids, torch.ones_like(ids), IMG).tolist() == [[-100] * 577 + tok("ab") + [2]]
    batch = next(iter(DataLoader(CaptionSet(tok), batch_size=6, collate_fn=collate(IMG, 576))))

    def caption_loss(module):
        with torch.no_grad():
            return float(module.loss(batch))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss0 = caption_loss(ProjectorFinetune(reduced))
    module = finetune(reduced, tok, epochs=4, batch_size=3, lr=3e-3, accelerator="cpu")
    assert caption_loss(module) < loss0 - 0.1
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed), changed


def test_wrapper_state_dict_is_the_models(llava):
    assert list(attach(llava, "visionzip", 64).state_dict()) == ["model." + k for k in llava.state_dict()]
