"""ViM and PlainMamba on timm's model contract: pretrained cfgs and local weight files, features_only and
forward_intermediates, classifier reset + fine-tuning, gradient checkpointing, weight-decay exclusions, the
data config the DataModule takes, and feature maps of pruned models. Tiny models, CPU."""
import tracemalloc

import pytest
import timm
import torch
from timm.data import resolve_model_data_config

import tokenprune
from tokenprune.data import ShardDataModule
from tokenprune.models import CheckpointMismatchError
from tokenprune.models.timm_contract import model_data_config

VIM, PM = "vim_test_patch4_32", "plainmamba_test_32"
BOTH = [VIM, PM]


def images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def official_file(name, model, path):
    """The model's weights in the official file layout: ViM {"model": ...}, PlainMamba mmcls keys."""
    sd = model.state_dict()
    if name.startswith("vim"):
        torch.save({"model": sd, "model_ema": {k: v * 0 for k, v in sd.items()}, "epoch": 3}, path)
    else:
        sd = {("head.fc." + k[5:] if k.startswith("head.") else "backbone." + k): v for k, v in sd.items()}
        torch.save({"state_dict": sd, "meta": {"epoch": 3}}, path)
    return path


@pytest.mark.parametrize("name", BOTH)
def test_pretrained_cfg_overlay_file_loads_strictly_like_checkpoint_file(name, tmp_path):
    torch.manual_seed(1)
    src = timm.create_model(name).eval()
    path = str(official_file(name, src, tmp_path / "official.pth"))
    a = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    b = timm.create_model(name, checkpoint_file=path).eval()
    x = images()
    with torch.no_grad():
        want = src(x)
        assert torch.equal(a(x), want) and torch.equal(b(x), want)
    assert a.pretrained_cfg["file"] == path and a.pretrained_cfg["state_dict"] is None  # tensors not kept
    # features_only loads the same file (before the getter wraps the model)
    feats = timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    with torch.no_grad():
        want_maps = src.forward_intermediates(x, indices=[3], intermediates_only=True)
        assert torch.equal(feats.eval()(x)[-1], want_maps[-1])
    # a different head size: timm's rule, the classifier is dropped and everything else loads
    c = timm.create_model(name, pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=path))
    assert c.get_classifier().out_features == 3
    assert torch.equal(c.state_dict()["pos_embed"], src.state_dict()["pos_embed"])
    # strict: a key missing from the file is named, through timm's route as through ours
    sd = torch.load(path, weights_only=True)
    inner = sd["model" if "model" in sd else "state_dict"]
    dropped = sorted(k for k in inner if k.endswith("A_log"))[0]
    del inner[dropped]
    torch.save(sd, tmp_path / "bad.pth")
    for kwargs in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "bad.pth"))),
                   dict(checkpoint_file=str(tmp_path / "bad.pth"))):
        with pytest.raises(CheckpointMismatchError, match="missing keys"):
            timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name,official", [("vim_small_patch16_224", "vim_s_midclstok_80p5acc.pth"),
                                           ("plainmamba_l3", "l3.pth")])
def test_pretrained_without_a_file_names_the_official_file(name, official):
    with pytest.raises(ValueError, match=official.replace(".", r"\.")) as err:
        timm.create_model(name, pretrained=True)
    assert "never downloaded" in str(err.value)
    cfg = timm.models.get_pretrained_cfg(name)
    assert not cfg.url and not cfg.hf_hub_id and any(official in n for n in cfg.notes)
    assert cfg.paper_ids and cfg.origin_url and cfg.first_conv and cfg.classifier == "head"


@pytest.mark.parametrize("name,expect", [
    ("vim_small_patch16_224", dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic")),
    ("plainmamba_l1", dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic")),
    (VIM, dict(input_size=(3, 32, 32), crop_pct=1.0)),
])
def test_data_config_and_the_datamodule_follow_the_model(name, expect):
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = resolve_model_data_config(model)
    assert {k: cfg[k] for k in expect} == expect
    assert cfg["mean"] == (0.485, 0.456, 0.406)
    dm = ShardDataModule(val_shards="x")
    dm.use_model_data_config(model_data_config(tokenprune.create_model(model)))  # through the wrapper
    assert dm.image_size == expect["input_size"][-1]
    assert dm.resize_size == int(expect["input_size"][-1] / expect["crop_pct"])
    # a value given to the DataModule overrides the model's
    dm = ShardDataModule(val_shards="x", mean=(0.5, 0.5, 0.5), resize_size=300, interpolation="bilinear")
    dm.use_model_data_config({**cfg, "mean": (0.1, 0.2, 0.3)})
    assert dm.mean == (0.5, 0.5, 0.5) and dm.resize_size == 300 and dm.std == cfg["std"]
    resize = dm.eval_transform().transforms[0]
    assert resize.size == 300 and resize.interpolation.value == "bilinear"


@pytest.mark.parametrize("name", BOTH)
def test_features_only_and_intermediates(name):
    x = images()
    feats = timm.create_model(name, features_only=True).eval()
    assert feats.feature_info.channels() == [32] * 4 and feats.feature_info.reduction() == [4] * 4
    with torch.no_grad():
        maps = feats(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8)] * 4
    model = timm.create_model(name).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 2], output_fmt="NHWC")
        assert torch.equal(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inter] == [(2, 8, 8, 32)] * 2
        # the features_only model is the same network cut after its last index
        feats2 = timm.create_model(name, features_only=True, out_indices=(1, 3))
        missing, _ = feats2.model.load_state_dict(model.state_dict(), strict=False)
        assert not missing  # the getter wraps the pruned model under `.model`; nothing of it left out
        got = feats2.eval()(x)
        want = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_vim_intermediates_drop_the_cls_and_give_it_apart():
    model = timm.create_model(VIM).eval()
    x = images()
    with torch.no_grad():
        (spatial, cls), = model.forward_intermediates(x, indices=[3], return_prefix_tokens=True, norm=True,
                                                       intermediates_only=True)
        tokens = model.forward_features(x)  # the last block's normed residual stream = forward_features
    c = model.cls_position
    assert torch.equal(cls, tokens[:, c])
    assert torch.equal(spatial.flatten(2).transpose(1, 2), torch.cat([tokens[:, :c], tokens[:, c + 1:]], 1))


@pytest.mark.parametrize("name", BOTH)
def test_head_contract_and_reset_classifier_then_fine_tune(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        model.eval()
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (4, model.head_hidden_size) and model.num_features == 32
        assert torch.equal(model.forward_head(feats), model(x))
        assert torch.equal(model(x), model.forward_tokens(x))  # timm path == token-interface path
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10 and model.num_classes == 10
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert sum(changed) > 0.9 * len(changed)
    model.reset_classifier(0, "")  # no head, no pooling: the features come out
    with torch.no_grad():
        assert model.eval()(x).shape == feats.shape


def _grads(model, x, y, checkpointing):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _peak_forward_bytes(model, x):
    """Peak CPU memory (bytes) allocated during a forward with grad, relative to its start, measured with
    torch.profiler(profile_memory=True): the running sum, in time order, of each op's own allocations
    (self_cpu_memory_usage) and of the frees between ops (the profiler's "[memory]" events). What stays
    allocated at the end is what autograd keeps for backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x)
    del out
    running = peak = 0
    for evt in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += evt.cpu_memory_usage if evt.name == "[memory]" else evt.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("name", BOTH)
def test_grad_checkpointing_same_gradients_less_memory(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.1).train()  # DropPath: checkpointing replays its RNG
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    plain = _grads(model, x, y, False)
    torch.manual_seed(5)
    ckpt = _grads(model, x, y, True)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    model.set_grad_checkpointing(False)
    full = _peak_forward_bytes(model, x)
    model.set_grad_checkpointing(True)
    less = _peak_forward_bytes(model, x)
    assert less < 0.6 * full, (less, full)
    # the pruning path checkpoints too
    pruned = tokenprune.create_model(model, "top" if name == VIM else "tome", keep=0.7)
    model.set_grad_checkpointing(False)
    full = _peak_forward_bytes(pruned, x)
    model.set_grad_checkpointing(True)
    assert _peak_forward_bytes(pruned, x) < 0.7 * full


def test_no_weight_decay_matches_the_official_recipes():
    vim = timm.create_model(VIM)
    nwd = vim.no_weight_decay()
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.3.mixer.A_b_log", "layers.1.mixer.D",
            "layers.2.mixer.D_b"} <= nwd
    assert not any("in_proj" in n or "x_proj" in n for n in nwd)
    params = dict(vim.named_parameters())
    assert nwd <= set(params)
    pm = timm.create_model(PM)
    nwd = pm.no_weight_decay()
    assert {"pos_embed", "layers.0.mamba.A_log", "layers.3.mamba.D", "layers.2.mamba.direction_Bs"} <= nwd
    assert nwd <= set(dict(pm.named_parameters()))
    # timm's optimizer factory reads it: A_log lands in the no-decay group
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(vim, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(params["layers.0.mixer.A_log"]) in no_decay and id(params["pos_embed"]) in no_decay
    assert id(params["layers.0.mixer.in_proj.weight"]) not in no_decay


@pytest.mark.parametrize("name,method", [(VIM, "hsa"), (PM, "tome")])
def test_pruned_model_feature_maps_fill_dropped_positions(name, method):
    torch.manual_seed(0)
    pruned = tokenprune.create_model(name, method, keep=0.5).eval()
    x = images()
    with torch.no_grad():
        logits = pruned(x)
        final, maps = pruned.forward_intermediates(x, fill_value=float("nan"))
        assert torch.equal(pruned(x), logits)  # forward unchanged
        feats = pruned.forward_features(x)
    kept = pruned.token_trace[-1].pos  # tokens left after the last stage
    assert final.shape == (2, 32, 8, 8) and len(maps) == 4
    holes = torch.isnan(final[:, 0]).flatten(1)
    n_patches_kept = int((kept >= 0).sum(1)[0]) - (1 if name == VIM else 0)
    assert int((~holes).sum(1)[0]) == n_patches_kept < 64
    assert torch.equal(torch.nan_to_num(final), feats)  # forward_features fills with 0
    # unpruned: the map is the backbone's own
    full = tokenprune.create_model(name).eval()
    full.backbone.load_state_dict(pruned.backbone.state_dict())
    with torch.no_grad():
        want = full.backbone.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(full.forward_features(x), want, rtol=0, atol=1e-6)


def test_lightning_module_sets_the_datamodule_transforms_from_its_backbone():
    from types import SimpleNamespace

    from tokenprune.lit.module import PruningClassifier

    module = PruningClassifier(VIM)
    dm = ShardDataModule(val_shards="x", mixup=0, cutmix=0, std=(0.5, 0.5, 0.5))
    assert dm.image_size == 224  # no model yet: timm's ImageNet defaults
    module._trainer = SimpleNamespace(datamodule=dm)
    module.setup("fit")
    assert (dm.image_size, dm.resize_size, dm.crop_pct) == (32, 32, 1.0)  # vim_test's cfg
    assert dm.mean == (0.485, 0.456, 0.406) and dm.std == (0.5, 0.5, 0.5)  # the given std wins
