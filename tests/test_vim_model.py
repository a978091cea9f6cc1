"""ViM: official parameter names/shapes/counts, strict loading of official-layout files, forward semantics."""
import math

import pytest
import timm
import torch

import tokenprune  # noqa: F401  (registers the models)
from tokenprune.models import CheckpointMismatchError
from tokenprune.ssm import selective_scan_reference
from tolerances import fp32_tol

COUNTS = {"vim_tiny_patch16_224": 7_148_008, "vim_small_patch16_224": 25_796_584,
          "vim_base_patch16_224": 97_598_440}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts_are_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert n_params(model) == COUNTS[name]


def test_state_dict_keys_and_shapes_follow_the_official_layout():
    with torch.device("meta"):
        sd = timm.create_model("vim_small_patch16_224").state_dict()
    D, E, N, R = 384, 768, 16, 24
    expect = {
        "cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
        "patch_embed.proj.bias": (D,), "head.weight": (1000, D), "head.bias": (1000,), "norm_f.weight": (D,),
        "layers.3.norm.weight": (D,), "layers.3.mixer.in_proj.weight": (2 * E, D),
        "layers.3.mixer.conv1d.weight": (E, 1, 4), "layers.3.mixer.conv1d.bias": (E,),
        "layers.3.mixer.x_proj.weight": (R + 2 * N, E), "layers.3.mixer.dt_proj.weight": (E, R),
        "layers.3.mixer.dt_proj.bias": (E,), "layers.3.mixer.A_log": (E, N), "layers.3.mixer.D": (E,),
        "layers.3.mixer.conv1d_b.weight": (E, 1, 4), "layers.3.mixer.conv1d_b.bias": (E,),
        "layers.3.mixer.x_proj_b.weight": (R + 2 * N, E), "layers.3.mixer.dt_proj_b.weight": (E, R),
        "layers.3.mixer.dt_proj_b.bias": (E,), "layers.3.mixer.A_b_log": (E, N), "layers.3.mixer.D_b": (E,),
        "layers.3.mixer.out_proj.weight": (D, E),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    per_layer = {k.split(".", 2)[2] for k in sd if k.startswith("layers.0.")}
    assert len(per_layer) == 17
    assert len(sd) == 7 + 24 * 17  # cls, pos, patch_embed w/b, norm_f, head w/b + 17 per layer
    assert not any("bias" in k for k in sd if "in_proj" in k or "out_proj" in k or "x_proj" in k)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("vim_test_patch4_32").eval()


def test_official_layout_file_loads_strictly(tiny, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    path = tmp_path / "vim_official.pth"
    sd = tiny.state_dict()
    torch.save({"model": sd, "optimizer": {}, "epoch": 299, "model_ema": {k: v * 0 for k, v in sd.items()}}, path)
    loaded = timm.create_model("vim_test_patch4_32", checkpoint_file=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny(images))
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    loaded = timm.create_model("vim_test_patch4_32", checkpoint_file=str(bare)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny(images))
    # timm's own checkpoint_path route reads the official {"model": ...} layout too
    model_only = tmp_path / "model_only.pth"
    torch.save({"model": sd, "epoch": 299}, model_only)
    loaded = timm.create_model("vim_test_patch4_32", checkpoint_path=str(model_only)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny(images))
    # use_ema picks the EMA weights (zeros here), which changes the output
    ema = timm.create_model("vim_test_patch4_32", checkpoint_file=str(path), use_ema=True)
    assert all(float(p.detach().abs().sum()) == 0 for p in ema.parameters())


def test_wrong_file_fails_with_the_key_list(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.pop("layers.1.mixer.A_b_log")
    sd["layers.1.mixer.unexpected"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(5, 32)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model("vim_test_patch4_32", checkpoint_file=str(path))
    msg = str(err.value)
    assert "layers.1.mixer.A_b_log" in msg and "layers.1.mixer.unexpected" in msg
    assert "head.weight: checkpoint (5, 32) vs model (10, 32)" in msg


def test_pretrained_without_file_says_nothing_is_downloaded():
    with pytest.raises(ValueError, match="checkpoint_file"):
        timm.create_model("vim_test_patch4_32", pretrained=True)


def test_middle_cls_and_position_embedding(tiny):
    state = tiny.embed(torch.randn(1, 3, 32, 32))
    assert state.x.shape == (1, 65, 32) and state.cls_index == 32
    assert state.protected[0].nonzero().flatten().tolist() == [32]
    assert state.patch_index()[0, 32] == -1 and state.patch_index()[0, 33] == 32


def _reference_mixer(mixer, h, directions=None):
    """Official v2 forward written directly with the reference scan (``directions``: a dict that receives the
    gated and ungated outputs of both directions, backward flipped back to token order)."""
    L = h.shape[1]
    xz = (h @ mixer.in_proj.weight.t()).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)

    def direction(x, z, conv, xp, dtp, A_log, D):
        u = torch.nn.functional.silu(conv(x)[..., :L])
        dbl = u.transpose(1, 2) @ xp.weight.t()
        dt, B, C = dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], -1)
        delta = (dt @ dtp.weight.t()).transpose(1, 2)
        return selective_scan_reference(u, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z,
                                        delta_bias=dtp.bias, delta_softplus=True)

    y = direction(x, z, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    yb = direction(x.flip(-1), z.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log,
                   mixer.D_b)
    if directions is not None:
        directions["gated"] = (y, yb.flip(-1))
        directions["ungated"] = (
            direction(x, None, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D),
            direction(x.flip(-1), None, mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log,
                      mixer.D_b).flip(-1))
    return ((y + yb.flip(-1)) / 2).transpose(1, 2) @ mixer.out_proj.weight.t()


def test_mixer_matches_the_official_v2_formula(tiny):
    mixer = tiny.layers[0].mixer
    h = torch.randn(2, 65, 32)
    with torch.no_grad():
        out, _ = mixer(h)
        # the model's matmul layout and CPU scan kernel vs the formula with the reference scan: fp32 rounding
        # over 65-step scans and 64-channel projections
        torch.testing.assert_close(out, _reference_mixer(mixer, h), **fp32_tol(out, terms=65))


def test_ssm_importances_are_the_clipped_channel_sums_of_both_directions(tiny):
    """ssm_out = ToP's tensor (scan output after the silu(z) gate); ssm_out_ungated = before the gate. Asking
    for them does not change the block's output."""
    mixer = tiny.layers[0].mixer
    h = torch.randn(2, 65, 32)
    ref = {}
    with torch.no_grad():
        plain, none = mixer(h)
        out, imp = mixer(h, want={"ssm_out", "ssm_out_ungated"})
        _reference_mixer(mixer, h, ref)
    assert none == {} and set(imp) == {"ssm_out", "ssm_out_ungated"}
    # asking for the ungated signal moves the silu(z) gate out of the scan kernel: fp32 rounding only
    torch.testing.assert_close(out, plain, **fp32_tol(plain, terms=65))
    for key, name in (("gated", "ssm_out"), ("ungated", "ssm_out_ungated")):
        y_f, y_b = ref[key]
        expected = y_f.clamp(min=0).sum(1) + y_b.clamp(min=0).sum(1)
        assert imp[name].shape == (2, 65)
        torch.testing.assert_close(imp[name], expected, **fp32_tol(expected, terms=65))
    assert not torch.allclose(imp["ssm_out"], imp["ssm_out_ungated"])


def test_forward_is_unpruned_token_path(tiny):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # explicit official loop: residual stream in fp32, final norm_f(residual + h), CLS read-out
        x = tiny.embed(images).x
        residual, h = None, x
        for layer in tiny.layers:
            h, residual, _ = layer(h, residual)
        feats = tiny.norm_f(residual + h)[:, 32]
        assert torch.equal(tiny(images), tiny.head(feats))
    assert math.isfinite(tiny(images).sum().item())


def test_stacked_direction_weights_are_cached_only_without_a_gradient():
    """The fused mixer's stacked x_proj / dt_proj weights: rebuilt while a gradient is recorded, cached for
    inference, rebuilt when a weight changes in place (optimizer step, load_state_dict), and cast to the
    autocast dtype under autocast."""
    from tokenprune.models.vim import BiMambaMixer, stacked_weights
    mixer = BiMambaMixer(16)
    names = ("x_proj.weight", "x_proj_b.weight")
    like = torch.empty(2, 3)
    expected = torch.stack([mixer.x_proj.weight, mixer.x_proj_b.weight])
    live = stacked_weights(mixer, names, like)
    assert live.grad_fn is not None and torch.equal(live, expected)
    with torch.no_grad():
        first = stacked_weights(mixer, names, like)
        assert first.grad_fn is None and torch.equal(first, expected)
        assert stacked_weights(mixer, names, like) is first  # cached
        mixer.x_proj_b.weight.add_(1.0)  # in place: the version counter moves
        again = stacked_weights(mixer, names, like)
        assert again is not first and torch.equal(again[1], mixer.x_proj_b.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = stacked_weights(mixer, names, like)
        assert cast.dtype == torch.bfloat16 and torch.equal(cast, again.to(torch.bfloat16))
        assert stacked_weights(mixer, names, like) is again  # the fp32 entry is still there
    mixer.load_state_dict({k: v + 1 for k, v in mixer.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(stacked_weights(mixer, names, like)[0], mixer.x_proj.weight)
