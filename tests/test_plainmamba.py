"""PlainMamba: official layout, counts and semantics, pruned zig-zag scans, alignment, FLOPs, method matrix."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.flops import count_flops
from tokenprune.models import CheckpointMismatchError
from tokenprune.models.plainmamba import PlainMamba, checkpoint_filter_fn
from tokenprune.models.plainmamba_scan import (RestrictedScan, restricted_scan, restricted_scan_tables, restricted_scans,
                                              scan_tables)
from tokenprune.pruning import BEFORE_ENCODER, METHODS, count_tokens, resolve_schedule
from tokenprune.tokens.state import initial_state
from tokenprune.ssm import scan_impl, selective_scan_reference
from tolerances import fp32_tol

TEST = "plainmamba_test_32"
# exact parameter counts (with the 1000-class head) and without the head (what the official README reports)
COUNTS = {"plainmamba_l1": (7_551_656, 7_358_656), "plainmamba_l2": (26_145_832, 25_760_832),
          "plainmamba_l3": (50_956_456, 50_507_456)}
PUBLISHED_M = {"plainmamba_l1": 7.3, "plainmamba_l2": 25.7, "plainmamba_l3": 50.5}
PUBLISHED_GFLOPS = {"plainmamba_l1": 3.0, "plainmamba_l2": 8.1, "plainmamba_l3": 14.4}
# ToP on PlainMamba-L3 (configs/experiment/top_plainmamba_l3.yaml): after blocks 8, 15, 22 keep 64 % each time
L3_LAYERS, L3_KEEP, L3_REDUCTION = [7, 14, 21], 0.64, 0.416


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model(TEST).eval()


@pytest.fixture(scope="module")
def lively():
    """The tiny model with weights large enough that every part of the block matters in the output."""
    torch.manual_seed(3)
    model = timm.create_model(TEST).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("in_proj.weight", "out_proj.weight", "x_proj.weight", "dt_proj.weight")):
                p.normal_(0, 0.3)
            elif name.endswith("direction_Bs"):
                p.normal_(0, 1.0)
            elif name.endswith("dt_proj.bias"):
                p.uniform_(-1.0, 0.5)
    return model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(2, 3, 32, 32)


# ------------------------------------------------------------------------------------ layout and counts
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    total, backbone = COUNTS[name]
    assert n_params(model) == total
    assert n_params(model) - n_params(model.head) == backbone
    # the official README's figures are the backbone without the classifier, truncated to 0.1 M
    assert math.floor(backbone / 1e5) / 10 == PUBLISHED_M[name]


def official_keys(model):
    return {("head.fc." + k[5:]) if k.startswith("head.") else "backbone." + k: v
            for k, v in model.state_dict().items()}


def test_state_dict_follows_the_official_layout():
    with torch.device("meta"):
        l1 = timm.create_model("plainmamba_l1")
        l3 = timm.create_model("plainmamba_l3")
    sd = official_keys(l1)
    D, E, N, R = 192, 384, 16, 12
    expect = {
        "backbone.patch_embed.stem.0.weight": (64, 3, 7, 7), "backbone.patch_embed.stem.1.running_var": (64,),
        "backbone.patch_embed.convs.0.weight": (64, 64, 3, 3), "backbone.patch_embed.convs.1.weight": (64,),
        "backbone.patch_embed.projection.weight": (D, 64, 8, 8), "backbone.patch_embed.projection.bias": (D,),
        "backbone.pos_embed": (1, 196, D), "backbone.ln1.weight": (D,), "backbone.ln1.bias": (D,),
        "backbone.layers.0.dw.0.weight": (D, 1, 3, 3), "backbone.layers.0.dw.1.num_batches_tracked": (),
        "backbone.layers.5.norm.weight": (D,), "backbone.layers.5.mamba.in_proj.weight": (2 * E, D),
        "backbone.layers.5.mamba.in_proj.bias": (2 * E,), "backbone.layers.5.mamba.conv2d.weight": (E, 1, 7, 7),
        "backbone.layers.5.mamba.conv2d.bias": (E,), "backbone.layers.5.mamba.x_proj.weight": (R + 2 * N, E),
        "backbone.layers.5.mamba.dt_proj.weight": (E, R), "backbone.layers.5.mamba.dt_proj.bias": (E,),
        "backbone.layers.5.mamba.A_log": (E, N), "backbone.layers.5.mamba.D": (E,),
        "backbone.layers.5.mamba.out_proj.weight": (D, E), "backbone.layers.5.mamba.out_proj.bias": (D,),
        "backbone.layers.5.mamba.direction_Bs": (5, N), "head.fc.weight": (1000, D), "head.fc.bias": (1000,),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("backbone.layers.1.dw") for k in sd)
    assert len([k for k in official_keys(l3) if k.startswith("backbone.layers.35.")]) == 14
    assert "backbone.patch_embed.convs.4.weight" in official_keys(l3)  # two stem convs on L2/L3


def save_official(model, path, ema_scale=None):
    sd = official_keys(model)
    if ema_scale is not None:  # the official EMA hook's buffers: ema_<name, dots as underscores>
        params = {n for n, _ in model.named_parameters()}
        for key, value in list(sd.items()):
            own = key[len("backbone."):] if key.startswith("backbone.") else "head." + key[len("head.fc."):]
            if own in params:
                sd["ema_" + key.replace(".", "_")] = value * ema_scale
    torch.save({"state_dict": sd, "meta": {"epoch": 300, "mmcls_version": "0.23.1", "CLASSES": None}}, path)


def test_official_file_loads_strictly(tiny, images, tmp_path):
    path = tmp_path / "l_official.pth"
    save_official(tiny, path, ema_scale=0.0)
    loaded = timm.create_model(TEST, checkpoint_file=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny(images))
    ema = timm.create_model(TEST, checkpoint_file=str(path), use_ema=True)
    assert all(float(p.detach().abs().sum()) == 0 for p in ema.parameters())
    assert torch.equal(ema.patch_embed.stem[1].running_var, tiny.patch_embed.stem[1].running_var)


def test_wrong_file_fails_with_the_key_list(tiny, tmp_path):
    sd = official_keys(tiny)
    sd.pop("backbone.layers.2.mamba.direction_Bs")
    sd["backbone.layers.2.mamba.gamma"] = torch.ones(32)
    sd["head.fc.weight"] = torch.zeros(1000, 32)
    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model(TEST, checkpoint_file=str(path))
    msg = str(err.value)
    assert "missing keys (1)" in msg and "layers.2.mamba.direction_Bs" in msg
    assert "unexpected keys (1)" in msg and "layers.2.mamba.gamma" in msg
    assert "head.weight: checkpoint (1000, 32) vs model (10, 32)" in msg
    no_ema = tmp_path / "no_ema.pth"
    save_official(tiny, no_ema)
    with pytest.raises(CheckpointMismatchError, match="use_ema=True but the file has none"):
        timm.create_model(TEST, checkpoint_file=str(no_ema), use_ema=True)


def test_filter_maps_official_names():
    sd = {"backbone.pos_embed": torch.zeros(1), "head.fc.weight": torch.ones(1), "head.fc.bias": torch.ones(1),
          "ema_backbone_pos_embed": torch.ones(1)}
    assert sorted(checkpoint_filter_fn(sd)) == ["head.bias", "head.weight", "pos_embed"]


# ------------------------------------------------------------------------------- unpruned semantics
def walk(H, W, start, first_dir, by_rows, line_step):
    """Zig-zag by walking: move along a line, at its end step one line over and turn around."""
    (r, c), d, out = start, first_dir, []
    while 0 <= r < H and 0 <= c < W:
        out.append(r * W + c)
        nr, nc = (r, c + d) if by_rows else (r + d, c)
        if 0 <= nr < H and 0 <= nc < W:
            r, c = nr, nc
        else:
            r, c, d = (r + line_step, c, -d) if by_rows else (r, c + line_step, -d)
    return out


def walk_orders(H, W):
    return [walk(H, W, (0, 0), 1, True, 1),
            walk(H, W, (H - 1, W - 1), -1, True, -1) if H % 2 else walk(H, W, (H - 1, 0), 1, True, -1),
            walk(H, W, (0, 0), 1, False, 1),
            walk(H, W, (H - 1, W - 1), -1, False, -1) if W % 2 else walk(H, W, (0, W - 1), 1, False, -1)]


def step_labels(order, W):
    names = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    rc = [divmod(p, W) for p in order]
    return [0] + [names[(b[0] - a[0], b[1] - a[1])] for a, b in zip(rc, rc[1:])]


@pytest.mark.parametrize("H,W", [(4, 4), (3, 5), (5, 2), (14, 14)])
def test_zigzag_tables_match_an_independent_walk(H, W):
    orders, inverse, labels = scan_tables(H, W)
    for k, order in enumerate(walk_orders(H, W)):
        assert orders[k].tolist() == order
        assert labels[k].tolist() == step_labels(order, W)
        assert torch.equal(orders[k][inverse[k]], torch.arange(H * W))


def official_forward(m, images):
    """The official computation written out op by op (dt/B/C in raster order, dt bias twice, z after the sum)."""
    H, W = m.grid
    L = H * W
    pe = m.patch_embed
    x = pe.stem(images)
    x = pe.convs(x) if pe.convs is not None else x
    x = pe.projection(x).flatten(2).transpose(1, 2) + m.pos_embed
    Bsz = x.shape[0]
    orders = walk_orders(H, W)
    for layer in m.layers:
        mx = layer.mamba
        E = mx.d_inner
        xz = mx.in_proj(layer.norm(x))
        A = -torch.exp(mx.A_log.float())
        xs, z = xz.chunk(2, dim=-1)
        xc = F.silu(mx.conv2d(xs.reshape(Bsz, H, W, E).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(Bsz, L, E)
        dt, Bm, Cm = torch.split(mx.x_proj(xc), [mx.dt_rank, mx.d_state, mx.d_state], dim=-1)
        dt = mx.dt_proj(dt).permute(0, 2, 1).contiguous()
        Bm, Cm = Bm.permute(0, 2, 1).contiguous(), Cm.permute(0, 2, 1).contiguous()
        ys = []
        for order in orders:
            o = torch.tensor(order)
            dB = mx.direction_Bs[torch.tensor(step_labels(order, W))][None].expand(Bsz, -1, -1).permute(0, 2, 1)
            y = selective_scan_reference(xc[:, o, :].permute(0, 2, 1).contiguous(), dt, A, (Bm + dB).contiguous(),
                                         Cm, mx.D.float(), z=None, delta_bias=mx.dt_proj.bias.float(),
                                         delta_softplus=True)
            ys.append(y.permute(0, 2, 1)[:, torch.argsort(o), :])
        x = mx.out_proj(sum(ys) * F.silu(z)) + x
        if layer.with_dwconv:
            g = layer.dw(x.reshape(Bsz, H, W, -1).permute(0, 3, 1, 2))
            x = g.reshape(Bsz, g.shape[1], L).permute(0, 2, 1)
    return m.head(m.ln1(x).mean(dim=1))


def test_unpruned_forward_is_the_official_computation(lively, images):
    with torch.no_grad(), scan_impl("reference"):
        assert torch.equal(lively(images), official_forward(lively, images))


def test_other_image_size_fails_clearly(tiny):
    with pytest.raises(ValueError, match="built for 32x32 images.*got 48x48"):
        tiny(torch.randn(1, 3, 48, 48))


# -------------------------------------------------------------------------------- pruned zig-zag scans
# Hand-made kept set on a 4 x 4 grid (raster positions), and what each order makes of it, worked out by hand
# from the full orders
#   0: 0 1 2 3 7 6 5 4 8 9 10 11 15 14 13 12      1: 12 13 14 15 11 10 9 8 4 5 6 7 3 2 1 0
#   2: 0 4 8 12 13 9 5 1 2 6 10 14 15 11 7 3      3: 3 7 11 15 14 10 6 2 1 5 9 13 12 8 4 0
KEPT = [0, 2, 5, 6, 9, 15]
VISITS = [[0, 2, 6, 5, 9, 15], [15, 9, 5, 6, 2, 0], [0, 9, 5, 2, 6, 15], [15, 6, 2, 5, 9, 0]]
GAPS = [[0, 1, 2, 0, 2, 2], [3, 2, 2, 0, 2, 1], [0, 4, 0, 1, 0, 2], [3, 2, 0, 1, 0, 4]]
# label of the full-scan step that entered each visited token (0 start, 1 right, 2 left, 3 up, 4 down)
LABELS = [[0, 1, 2, 2, 1, 4], [1, 2, 1, 1, 2, 2], [0, 3, 3, 1, 4, 1], [4, 3, 3, 4, 4, 3]]


def test_restricted_orders_gaps_and_labels_on_a_hand_made_kept_set():
    _, inverse, labels = scan_tables(4, 4)
    pos = torch.tensor([KEPT])
    for k, scan in enumerate(restricted_scans(pos, inverse, labels)):
        assert pos[0, scan.perm[0]].tolist() == VISITS[k], k
        assert scan.gaps[0].tolist() == GAPS[k], k
        assert scan.labels[0].tolist() == LABELS[k], k
        assert torch.equal(scan.perm.gather(1, scan.inverse), torch.arange(6)[None])


def test_restricted_orders_keep_the_relative_order_of_the_full_scan():
    torch.manual_seed(5)
    orders, inverse, labels = scan_tables(14, 14)
    pos = torch.stack([torch.randperm(196)[:61].sort().values for _ in range(3)])
    for k, scan in enumerate(restricted_scans(pos, inverse, labels)):
        for b in range(3):
            keep = set(pos[b].tolist())
            assert pos[b, scan.perm[b]].tolist() == [p for p in orders[k].tolist() if p in keep]
            assert int(scan.gaps[b].sum()) + 61 == int(inverse[k][pos[b]].max()) + 1


def test_all_orders_at_once_equal_each_order_restricted_alone():
    """restricted_scan_tables (every order in one sort) gives restricted_scan's perm, inverse, labels and gaps
    for each order, on rows of any token order (as merged tokens come)."""
    torch.manual_seed(7)
    _, inverse, labels = scan_tables(6, 9)
    pos = torch.stack([torch.randperm(54)[:23] for _ in range(4)])  # not sorted
    tables = restricted_scan_tables(pos, inverse, labels)
    assert tables.perm.shape == (4, 4, 23)
    for k in range(4):
        alone = restricted_scan(pos, inverse[k], labels[k])
        for field in RestrictedScan._fields:
            assert torch.equal(getattr(tables, field)[k], getattr(alone, field)), (k, field)


def manual_mixer(mx, x, pos, grid, gaps=False):
    """The pruned mixer written out with the hand-made orders: u in restricted zig-zag order, dt/B/C in token
    (raster) order, per-step labels from LABELS, optional exp((1+g) delta A) decay, by an explicit loop."""
    H, W = grid
    Bsz, T, _ = x.shape
    E, N = mx.d_inner, mx.d_state
    xs, z = mx.in_proj(x).chunk(2, dim=-1)
    full = torch.zeros(Bsz, H * W, E)
    full[:, pos] = xs
    xc = F.silu(mx.conv2d(full.reshape(Bsz, H, W, E).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(
        Bsz, H * W, E)[:, pos]
    dt, Bm, Cm = torch.split(mx.x_proj(xc), [mx.dt_rank, N, N], dim=-1)
    delta = F.softplus(mx.dt_proj(dt) + mx.dt_proj.bias)  # (b, T, E): the bias twice
    A = -torch.exp(mx.A_log)
    total = 0
    for k in range(4):
        tok = [pos.index(p) for p in VISITS[k]]
        h = torch.zeros(Bsz, E, N)
        y = torch.zeros(Bsz, T, E)
        for j in range(T):
            u = xc[:, tok[j]]  # (b, E)
            scale = 1 + GAPS[k][j] if gaps else 1
            Bj = Bm[:, j] + mx.direction_Bs[LABELS[k][j]]  # raster-order B of step j + label of step j
            h = torch.exp(scale * delta[:, j, :, None] * A) * h + (delta[:, j] * u)[..., None] * Bj[:, None]
            y[:, tok[j]] = (h * Cm[:, j, None]).sum(-1) + mx.D * u
        total = total + y
    return mx.out_proj(total * F.silu(z))


@pytest.mark.parametrize("gaps", [False, True])
def test_pruned_mixer_scans_the_restricted_orders(gaps):
    torch.manual_seed(4)
    model = PlainMamba(img_size=16, patch_size=4, embed_dim=8, depth=1, d_state=3, num_classes=2)
    mx = model.layers[0].mamba
    with torch.no_grad():
        mx.direction_Bs.normal_()
        mx.dt_proj.bias.uniform_(-1, 0.5)
        for lin in (mx.in_proj, mx.x_proj, mx.dt_proj, mx.out_proj):
            lin.weight.normal_(0, 0.4)
    assert mx.grid == (4, 4)
    x = torch.randn(2, len(KEPT), 8)
    pos = torch.tensor([KEPT, KEPT])
    ctx = model.scan_context(pos)
    if not gaps:
        ctx["scans"] = [s._replace(gaps=None) for s in ctx["scans"]]
    with torch.no_grad(), scan_impl("reference"):
        out, importances = mx(x, ctx, want={"ssm_out"})
        expected = manual_mixer(mx, x, KEPT, (4, 4), gaps=gaps)
    # the loop against the batched scans: fp32 rounding over 4 orders of len(KEPT) steps
    torch.testing.assert_close(out, expected, **fp32_tol(expected, terms=4 * len(KEPT)))
    assert set(importances) == {"ssm_out"}
    assert importances["ssm_out"].shape == (2, 6) and bool((importances["ssm_out"] >= 0).all())


def test_general_path_with_every_token_equals_the_fast_path(lively, images):
    state = lively.embed(images)
    with torch.no_grad():
        fast = lively.layers[0](state.x)[0]
        ctx = lively.scan_context(state.pos)
        ctx["scans"] = [s._replace(gaps=None) for s in ctx["scans"]]
        general = lively.layers[0](state.x, ctx)[0]
    # the same math in another order (per-scan gathers vs the fast tables): fp32 rounding at the tensor's scale
    # (entries up to ~29: ~1e-6 absolute, also at entries of size 1e-3), a 64-step scan per order
    torch.testing.assert_close(general, fast, **fp32_tol(fast, terms=64))


def test_pruned_batch_equals_each_image_alone(lively, images):
    model = tokenprune.create_model(lively, "hsa", keep=0.6).eval()
    with torch.no_grad():
        both = model(images)
        kept = [t.pos for t in model.token_trace]
        alone = torch.cat([model(images[i:i + 1]) for i in range(2)])
    assert not torch.equal(kept[0][0], kept[0][1])  # different kept sets per image
    # batched (other shapes, other kernel blocking) vs one image: fp32 rounding through 4 blocks of <= 64-step scans
    torch.testing.assert_close(both, alone, **fp32_tol(alone, terms=4 * 64))


def test_alignment_variants(lively, images):
    with torch.no_grad():
        plain = tokenprune.create_model(lively, "top", keep=0.5)(images)
        gap = tokenprune.create_model(lively, "hsa", keep=0.5)(images)
        mask_model = tokenprune.create_model(lively, "hsa", keep=0.5, alignment="mask").eval()
        mask = mask_model(images)
    assert not torch.allclose(plain, gap, atol=1e-4) and not torch.allclose(plain, mask, atol=1e-4)
    # mask = the block on the full grid with zeros at pruned positions, then the kept tokens gathered
    state = lively.embed(images)
    with torch.no_grad():
        state = lively.run_block(0, state)
    pos = torch.tensor([[1, 5, 9, 30, 63]] * 2)
    pruned = state.gather(pos).with_tokens(extras={"align": "mask", "reduced": True})
    with torch.no_grad():
        out = lively.run_block(1, pruned).x
        full = torch.zeros_like(state.x).scatter(1, pos[..., None].expand(-1, -1, 32), pruned.x)
        expected = lively.layers[1](full)[0].gather(1, pos[..., None].expand(-1, -1, 32))
    assert torch.equal(out, expected)


def test_ssm_out_signal(lively, images):
    """ssm_out: every scan order's gated output (as ToP on ViM), clipped, channel-summed; ungated: before
    the silu(z) gate."""
    seen = {}

    class Hook:
        needs = {"ssm_out", "ssm_out_ungated"}

        def __call__(self, state, signals):
            seen.update(signals)
            return state

    with torch.no_grad():
        state = lively.run_block(1, lively.embed(images), Hook())
        mx = lively.layers[1].mamba
        ys = []
        original = mx._scan
        mx._scan = lambda *a: ys.append(original(*a)) or ys[-1]
        try:
            lively.layers[1](lively.embed(images).x)
        finally:
            del mx._scan
        x_in = mx.in_proj(lively.layers[1].norm(lively.embed(images).x))
        gate = torch.nn.functional.silu(x_in.chunk(2, dim=-1)[1])
    assert seen["ssm_out"].shape == (2, 64) and torch.equal(seen["hidden"], state.x)
    torch.testing.assert_close(seen["ssm_out"], sum((y * gate).clamp(min=0).sum(-1) for y in ys))
    torch.testing.assert_close(seen["ssm_out_ungated"], sum(y.clamp(min=0).sum(-1) for y in ys))


def test_classify_weights_merged_tokens_by_size(tiny):
    x = torch.randn(1, 3, 32)
    state = initial_state(torch.randn(1, 64, 32), (8, 8)).gather(torch.tensor([[0, 5, 9]]))
    state = state.with_tokens(x=x)
    plain = tiny.classify(state)
    torch.testing.assert_close(plain, tiny.head(tiny.ln1(x).mean(1)))
    # a merging reducer flags its sizes (the flag, not a read-back of the sizes, picks the weighted mean)
    merged = tiny.classify(state.with_tokens(size=torch.tensor([[1.0, 3.0, 2.0]]), extras={"merged": True}))
    h = tiny.ln1(x)
    torch.testing.assert_close(merged, tiny.head((h[:, 0] + 3 * h[:, 1] + 2 * h[:, 2]) / 6))


# ---------------------------------------------------------------------------------------------- FLOPs
def plainmamba_flops(D, tokens, L=196, N=16, k=7, classes=1000, num_convs=2, stem=64, patch=16, img=224,
                     dw_layers=(), extra_bn_tokens=None):
    """fvcore count of one forward at batch 1 (one FMA = one FLOP; LayerNorm 5/element, BN in eval 2/element),
    `tokens[i]` tokens entering block i; the depthwise convs run on the full grid (zeros at pruned positions)."""
    E, R = 2 * D, math.ceil(D / 16)
    s = (img // 2) ** 2
    f = s * stem * 3 * 49 + 2 * s * stem + num_convs * (s * stem * stem * 9 + 2 * s * stem)
    f += L * D * stem * (patch // 2) ** 2
    for i, T in enumerate(tokens):
        f += 5 * T * D + T * D * 2 * E + L * E * k * k + T * E * (R + 2 * N) + T * R * E + T * E * D
        f += 4 * (9 * T * E * N + T * E)  # four directions, D skip included
        if i in dw_layers:
            f += L * D * 9 + 2 * T * D
    return f + 5 * tokens[-1] * D + D * classes


def schedule_tokens(depth, layers, keep, L=196):
    tokens, t = [], L
    for i in range(depth):
        tokens.append(t)
        if i in layers:
            t = count_tokens(t, keep)
    return tokens


TINY = dict(D=32, L=64, N=4, classes=10, num_convs=1, stem=16, patch=4, img=32, dw_layers=(0,))


@pytest.mark.parametrize("method,keep", [(None, 1.0), ("hsa", 0.6), ("top", 0.5)])
def test_flops_equal_the_analytic_count(tiny, method, keep):
    model = tokenprune.create_model(tiny, method, keep=keep)
    layers = [] if method is None else resolve_schedule("thirds", 4, "post")
    assert count_flops(model).total == plainmamba_flops(tokens=schedule_tokens(4, layers, keep, 64), **TINY)


def test_top_schedule_on_l3_cuts_flops_by_the_published_share():
    """Analytic count (equal to count_flops, see above and the slow test below): 14.45 G -> 8.43 G."""
    assert resolve_schedule("thirds", 36, "post") == L3_LAYERS
    tokens = schedule_tokens(36, L3_LAYERS, L3_KEEP)
    assert sorted(set(tokens), reverse=True) == [196, 125, 80, 51]
    full = plainmamba_flops(448, [196] * 36)
    pruned = plainmamba_flops(448, tokens)
    assert abs(full / 1e9 - PUBLISHED_GFLOPS["plainmamba_l3"]) < 0.06
    assert abs((1 - pruned / full) - L3_REDUCTION) < 0.01


@pytest.mark.slow
def test_published_flops_and_the_l3_schedule_with_fvcore():
    for name, (D, depth, convs, dw) in {"plainmamba_l1": (192, 24, 1, (0,)), "plainmamba_l2": (384, 24, 2, ()),
                                        "plainmamba_l3": (448, 36, 2, ())}.items():
        total = count_flops(timm.create_model(name)).total
        assert total == plainmamba_flops(D, [196] * depth, num_convs=convs, dw_layers=dw)
        assert abs(total / 1e9 - PUBLISHED_GFLOPS[name]) < 0.06, (name, total)
    pruned = tokenprune.create_model("plainmamba_l3", "hsa", keep=L3_KEEP, layers=L3_LAYERS)
    assert count_flops(pruned).total == plainmamba_flops(448, schedule_tokens(36, L3_LAYERS, L3_KEEP))


# ------------------------------------------------------------------------------ method x backbone matrix
APPLICABLE = sorted(m for m in METHODS if "ssm" in METHODS[m].families and m != "evit")
MERGING = {"tome", "pumer", "utr"}


def expected_counts(method, keep, n=64, depth=4):
    spec = METHODS[method]
    if spec.schedule == "embed":
        return [count_tokens(n, keep)]
    if spec.schedule == "every":  # ToMe merges at most floor(T / 2) per layer
        counts, t = [], n
        for _ in range(depth):
            t = max(count_tokens(t, keep), t - t // 2)
            counts.append(t)
        return counts
    counts, t = [], n
    for _ in resolve_schedule(spec.schedule, depth, "post"):
        t = count_tokens(t, keep)
        counts.append(t)
    return counts


def test_keep_one_is_bit_identical_for_every_preset(tiny, proposal, images):
    with torch.no_grad():
        ref = tiny(images)
        for method in METHODS:
            out = tokenprune.create_model(tiny, method, keep=1.0, proposal=proposal)(images)
            assert torch.equal(out, ref), method
        for alignment in ("mask", "gap"):
            out = tokenprune.create_model(tiny, "hsa", keep=1.0, alignment=alignment)(images)
            assert torch.equal(out, ref), alignment


CASES = [(m, k) for m in APPLICABLE for k in (0.8, 0.6, 0.5)]


@pytest.mark.parametrize("method,keep", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_method_matrix_on_plainmamba(method, keep, tiny, proposal, images):
    model = tokenprune.create_model(tiny, method, keep=keep, proposal=proposal).eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    trace = model.token_trace
    assert [t.tokens_out for t in trace] == expected_counts(method, keep)
    simulated = model.tokens_per_block()
    for t in trace:
        block = 0 if t.layer == BEFORE_ENCODER else t.layer + 1
        if block < len(simulated):
            assert simulated[block] == t.tokens_out
        assert t.cls_index is None and not bool(t.protected.any())
        assert bool((t.pos[:, 1:] > t.pos[:, :-1]).all()) and int(t.pos.min()) >= 0  # raster order
        if method in MERGING:
            assert bool((t.size >= 1).all()) and float(t.size.sum(1).max()) <= 64
            if method == "tome":
                torch.testing.assert_close(t.size.sum(1), torch.full((2,), 64.0))
        else:
            assert bool((t.size == 1).all())


@pytest.mark.parametrize("method,match", [("evit", "needs a CLS token"), ("visionzip", "defined for")])
def test_methods_that_need_a_cls_or_attention_fail_clearly(method, match):
    with pytest.raises(ValueError, match=match):
        tokenprune.create_model(TEST, method, keep=0.5)


def test_presets_by_name_and_the_micro_variant():
    model = tokenprune.create_model(TEST, "top", keep=0.5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert [t.tokens_out for t in model.token_trace] == [32, 16]
    micro = tokenprune.create_model("plainmamba_micro_patch4_56", "hsa", keep=0.7).eval()
    assert micro.backbone.grid == (14, 14) and micro.backbone.seq_len == 196
    with torch.no_grad():
        assert micro(torch.randn(1, 3, 56, 56)).shape == (1, 10)
    assert [t.tokens_out for t in micro.token_trace] == [137, 96, 67]
