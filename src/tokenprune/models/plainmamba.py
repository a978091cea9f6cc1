"""PlainMamba (ChenhongyiYang/PlainMamba), checkpoint-compatible, with the token interface.

Module and parameter names follow the official backbone (the mmcls files store them under `backbone.`),
so `checkpoint_filter_fn` only strips that prefix, renames the classifier `head.fc.*` -> `head.*` and
drops mmcv's EMA buffers. What the official block does, and we reproduce (docs/plainmamba.md):

- stem: 7x7/2 conv (no bias) + BN + ReLU, `num_convs` x [3x3 conv (no bias) + BN + ReLU] at 64 channels,
  then a (p/2)x(p/2) stride-(p/2) conv to the embedding (bottom/right "corner" padding when needed);
  learned pos-embed, no CLS;
- block: x + drop_path(mixer(LayerNorm(x))), then (L1, block 0 only) depthwise 3x3 conv + BN + GELU on the
  grid, applied to the block output without a residual;
- mixer: in_proj (bias) -> x, z; x -> depthwise 7x7 Conv2d (bias) on the grid -> SiLU; x_proj -> dt, B, C;
  dt = dt_proj(dt) *with* its bias, and the scan adds the same bias again inside the softplus (the dt bias
  is applied twice); four zig-zag scans whose *input* u is permuted into each order while dt, B and C stay
  in raster order (step t of every scan uses dt/B/C of raster position t); B + direction_Bs[label of step t];
  D skip, no gate inside the scan; outputs un-permuted and summed, then * SiLU(z), out_proj (bias);
- final LayerNorm (eps 1e-6, official name `ln1`), mean over tokens, Linear head.

Pruned tokens: `state.pos` holds the raster positions of the kept tokens (ascending). Each zig-zag scan is
the full order restricted to them; the raster-order quirk carries over (step j uses dt/B/C of the j-th kept
token in raster order); each step keeps the direction label the full scan gave the token it visits; the
depthwise convs run on the grid with zeros at pruned positions. Alignment (`state.extras["align"]`):
"gap" scales the decay of each step by (1 + pruned positions skipped in *that* order), "mask" runs the block
on the full grid with zeros at pruned positions and gathers the kept tokens back.
"""
from __future__ import annotations

import math
from typing import AbstractSet, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from ..compat import feature_take_indices
from torch import nn

from ..tokens.state import TokenState, initial_state, static_index
from ..ssm import selective_scan
from ..ssm.fused_ops import fused_selective_scan
from ..ssm.scan import _record, on_triton
from .base import SSM_SIGNALS, TokenBackbone, clipped_channel_sum
from .plainmamba_scan import (NUM_DIRECTION_LABELS, NUM_ORDERS, RestrictedScan, per_order, restricted_scan_tables,
                              scan_tables)
from .timm_contract import TimmHeadMixin, run_layer, tokens_to_map
from .vim import DirectionScope

ScanContext = Dict[str, object]


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def flat_index(idx: torch.Tensor, stride: int) -> torch.Tensor:
    """(..., b, T) row-wise indices -> (..., b*T) indices into the (b*stride, C) view of a (b, stride, C)
    tensor (the row offsets are built once per shape and device)."""
    b = int(idx.shape[-2])
    offsets = static_index(("row_offsets", b, stride), idx.device,
                           lambda d: torch.arange(b, device=d).unsqueeze(1) * stride)
    return (idx + offsets).flatten(-2)


def take(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Row-wise gather with flat indices: (b, S, C) -> (b, T, C) (index_select: cheaper than gather)."""
    b, S, C = x.shape
    return x.reshape(b * S, C).index_select(0, flat).view(b, -1, C)


def put(x: torch.Tensor, flat: torch.Tensor, length: int) -> torch.Tensor:
    """Row-wise scatter into zeros: (b, T, C) -> (b, length, C) with x at the flat indices."""
    b, T, C = x.shape
    out = x.new_zeros(b * length, C)
    out.index_put_((flat,), x.reshape(b * T, C))
    return out.view(b, length, C)


def _to_grid(tokens: torch.Tensor, grid_index: Optional[torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
    """(B, T, C) tokens -> (B, C, H, W) view as the official code makes it; pruned positions are zeros.
    grid_index: flat_index(pos, H*W) of the current tokens, or None when all H*W tokens are present."""
    B, T, C = tokens.shape
    H, W = grid
    if grid_index is not None:
        tokens = put(tokens, grid_index, H * W)
    return tokens.reshape(B, H, W, C).permute(0, 3, 1, 2)


def _from_grid(x: torch.Tensor, grid_index: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C) at the current tokens (all positions when grid_index is None)."""
    B, C, H, W = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    return flat if grid_index is None else take(flat, grid_index)


def _matmul_cm(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear applied to channel-major x (b, C_in, T) -> (b, C_out, T): one batched matmul with the weight
    broadcast over the batch (bias in the same kernel), and any (b, C, T) strides of x (a transposed
    token-major tensor is read as it is)."""
    b = x.shape[0]
    w = linear.weight.expand(b, -1, -1)
    if linear.bias is None:
        return torch.bmm(w, x)
    return torch.baddbmm(linear.bias[None, :, None], w, x)


class ConvPatchEmbed(nn.Module):
    """Official conv stem: 7x7/2 conv-BN-ReLU, `num_convs` 3x3 conv-BN-ReLU, (p/2)x(p/2)/(p/2) projection."""

    def __init__(self, img_size=224, in_chans: int = 3, embed_dim: int = 192, num_convs: int = 1,
                 patch_size: int = 16, stem_chs: int = 64):
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"PlainMamba's stem halves the image first, so patch_size must be even, got {patch_size}")
        self.img_size, self.patch_size, self.in_chans = _pair(img_size), patch_size, in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_chs, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_chs),
                                  nn.ReLU(inplace=True))
        convs: List[nn.Module] = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(stem_chs, stem_chs, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_chs),
                      nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs) if convs else None
        self.kernel = patch_size // 2
        self.projection = nn.Conv2d(stem_chs, embed_dim, self.kernel, self.kernel)
        self.grid_size = self.out_size(self.img_size)

    @property
    def proj(self) -> nn.Module:
        """The first conv (input channels = image channels), for code that reads `patch_embed.proj`."""
        return self.stem[0]

    def out_size(self, hw: Sequence[int]) -> Tuple[int, int]:
        h, w = ((s + 1) // 2 for s in hw)  # after the 7x7 stride-2 conv with padding 3
        return math.ceil(h / self.kernel), math.ceil(w / self.kernel)

    def _corner_pad(self, x: torch.Tensor) -> torch.Tensor:
        """mmcv AdaptivePadding("corner"): pad bottom/right so the projection covers every pixel."""
        h, w = x.shape[-2:]
        pad_h = max((math.ceil(h / self.kernel) - 1) * self.kernel + self.kernel - h, 0)
        pad_w = max((math.ceil(w / self.kernel) - 1) * self.kernel + self.kernel - w, 0)
        if pad_h or pad_w:
            x = F.pad(x, [0, pad_w, 0, pad_h])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_size(x.shape[-2:]) != self.grid_size:  # a clear error instead of a pos-embed size clash
            raise ValueError(f"PlainMamba was built for {self.img_size[0]}x{self.img_size[1]} images (a "
                             f"{self.grid_size[0]}x{self.grid_size[1]} grid); got {x.shape[-2]}x{x.shape[-1]}. "
                             "Create it with img_size=<your size> for another resolution.")
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        x = self.projection(self._corner_pad(x))
        return x.flatten(2).transpose(1, 2)


class PlainMamba2D(nn.Module):
    """The official mixer (parameter names kept): four zig-zag selective scans with direction-aware B."""

    def __init__(self, d_model: int, grid: Tuple[int, int], d_state: int = 16, expand: int = 2,
                 dt_rank="auto", conv_size: int = 7, conv_bias: bool = True, bias: bool = True,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        if conv_size % 2 != 1:
            raise ValueError(f"conv_size must be odd, got {conv_size}")
        self.d_model, self.d_state, self.grid = d_model, d_state, tuple(grid)
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv2d = nn.Conv2d(E, E, conv_size, padding=conv_size // 2, groups=E, bias=conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
            min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        self.direction_Bs = nn.Parameter(torch.zeros(NUM_DIRECTION_LABELS, N))
        trunc_normal_(self.direction_Bs, std=0.02)
        for p in (self.A_log, self.D, self.direction_Bs):  # the official recipe: no weight decay on these
            p._no_weight_decay = True
        orders, inverse, labels = scan_tables(*self.grid)
        self.register_buffer("orders", orders, persistent=False)
        self.register_buffer("order_inverse", inverse, persistent=False)
        self.register_buffer("order_labels", labels, persistent=False)
        self.scans = nn.ModuleList(DirectionScope() for _ in range(NUM_ORDERS))  # FLOPs per direction

    # -- one direction ------------------------------------------------------------------------------------
    def _scan(self, x_conv, dt, A, Bm, Cm, k: int, ctx: Optional[ScanContext]):
        """Scan k on x_conv (b, T, E) in token order; returns (b, T, E) in token order."""
        b, T, E = x_conv.shape
        scan: Optional[RestrictedScan] = None if ctx is None else ctx["scans"][k]
        if scan is None:  # unpruned: the official tables
            u = x_conv.index_select(1, self.orders[k])
            dB = self.direction_Bs[self.order_labels[k]].t().unsqueeze(0).expand(b, -1, -1)
        else:
            u = take(x_conv, ctx["visit"][k])
            dB = self.direction_Bs[scan.labels].transpose(1, 2)
        u = u.transpose(1, 2).contiguous()
        B_k = (Bm + dB.to(dtype=Bm.dtype)).contiguous()
        if scan is None or scan.gaps is None:
            y = selective_scan(u, dt, A, B_k, Cm, self.D.float(), z=None, delta_bias=self.dt_proj.bias.float(),
                               delta_softplus=True)
        else:  # gap-aware decay: exp((1+g) delta A), input term delta B u unchanged
            scale = (1.0 + scan.gaps.float()).unsqueeze(1)  # (b, 1, T), per scan step
            delta = F.softplus(dt.float() + self.dt_proj.bias.float()[None, :, None]) * scale
            B_k = B_k.float() / scale
            # back to the input dtype: mamba-ssm's kernel wants delta and a variable B in u's dtype (bf16 AMP)
            y = selective_scan(u, delta.to(u.dtype), A, B_k.to(Bm.dtype), Cm, self.D.float(), z=None,
                               delta_softplus=False)
        y = y.transpose(1, 2)  # (b, T, E) in scan-step order
        if scan is None:
            return y.index_select(1, self.order_inverse[k])
        return take(y, ctx["unvisit"][k])

    # -- the GPU path ---------------------------------------------------------------------------------------
    def _forward_fused(self, x: torch.Tensor, ctx: Optional[ScanContext]) -> torch.Tensor:
        """The same mixer on the fused Triton scan, channel-major from the conv on: the conv's (b, E, H, W)
        output is the (b, E, L) layout the scan reads (unit stride along L), x_proj and dt_proj are batched
        matmuls that keep it (dt_proj's bias added in the same kernel), B/C are views of x_proj's output, the
        direction-aware B of all four orders comes from one lookup, A = -exp(A_log), Δ bias + softplus and the
        D skip are fused in the scan, and gap-aware decay is the scan's `gap` input (B unscaled). No transposed
        copies of dt/B/C or of each scan's input and output, as the per-scan path makes."""
        if not torch.compiler.is_compiling():
            _record("triton")  # scan_impl_report() tells which scan ran
        b, T, D = x.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        H, W = self.grid
        xz = _matmul_cm(self.in_proj, x.transpose(1, 2))  # (b, 2E, T), channel-major
        xs, z = xz[:, :E], xz[:, E:]
        if ctx is None:
            grid = xs.view(b, E, H, W)
        else:  # the current tokens on the zero-filled grid
            grid = xs.new_zeros(b, E, H * W).scatter_(2, ctx["pos"].unsqueeze(1).expand(b, E, T), xs)
            grid = grid.view(b, E, H, W)
        u = F.silu(self.conv2d(grid)).flatten(2)  # (b, E, H*W)
        if ctx is not None:  # back to the current tokens
            u = u.gather(2, ctx["pos"].unsqueeze(1).expand(b, E, T))
        dbl = _matmul_cm(self.x_proj, u)  # (b, R + 2N, T)
        dt = _matmul_cm(self.dt_proj, dbl[:, :R])  # (b, E, T): the bias is added here and again in the scan
        bc = dbl[:, R:].float()  # B and C in fp32 in one cast (fused_selective_scan would cast each)
        Bm, Cm = bc[:, :N], bc[:, N:]
        # the direction-aware part of B for all four orders in one lookup: (4, N, L), or (4, b, N, T) when pruned
        dB = self.direction_Bs[self.order_labels if ctx is None else ctx["labels"]].transpose(-1, -2)
        B4 = Bm.unsqueeze(0) + (dB.unsqueeze(1) if ctx is None else dB).to(Bm.dtype)  # (4, b, N, T)
        if ctx is None:
            idx, gap = self.orders.unsqueeze(1).expand(NUM_ORDERS, b, T), None
        else:
            idx = ctx["perm"]
            gap = None if ctx["scans"][0].gaps is None else ctx["gap_scale"]

        def shared(t):  # the four orders read the same tensor: a stride-0 expansion, no copy
            return t.unsqueeze(0).expand(NUM_ORDERS, *t.shape)
        # the four orders in one launch: each reads u at its zig-zag order by index and adds its output back in
        # token order (dt/B/C per step, the official raster-order quirk), A_log, Δ bias + softplus, the D skip,
        # the gap-aware decay and the silu(z) gate fused
        gated = fused_selective_scan(shared(u), shared(dt), self.A_log, B4, shared(Cm), self.D, z, self.dt_proj.bias,
                                     A1=self.A_log, D1=self.D, bias1=self.dt_proj.bias, gap=gap, idx=idx,
                                     softplus=True, a_is_log=True, scale=1.0)  # (b, E, T)
        return _matmul_cm(self.out_proj, gated).transpose(1, 2)  # (b, T, D) view of the (b, D, T) product

    def forward(self, x: torch.Tensor, ctx: Optional[ScanContext] = None, want: AbstractSet[str] = frozenset()):
        """x (b, T, D) in raster order of the current tokens; ctx None = all H*W tokens, unpruned.
        Returns the output and the SSM importances named in ``want`` ((b, T) each, token order)."""
        fused = None if want else on_triton(x, self._forward_fused, x, ctx)
        if fused is not None:
            return fused, {}
        grid_index = None if ctx is None else ctx["grid_index"]
        xz = self.in_proj(x)
        A = -torch.exp(self.A_log.float())
        x, z = xz.chunk(2, dim=-1)
        x_conv = _from_grid(F.silu(self.conv2d(_to_grid(x, grid_index, self.grid))), grid_index)
        x_dbl = self.x_proj(x_conv)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt)  # the bias is added here, and again inside the scan's softplus (official)
        dt = dt.permute(0, 2, 1).contiguous()
        Bm = Bm.permute(0, 2, 1).contiguous()
        Cm = Cm.permute(0, 2, 1).contiguous()
        ys = [self.scans[k](self._scan, x_conv, dt, A, Bm, Cm, k, ctx) for k in range(NUM_ORDERS)]
        gate = F.silu(z)
        out = self.out_proj(sum(ys) * gate)
        importances = {}
        if "ssm_out" in want:  # as on ViM: each scan order's gated output, clipped, channel-summed
            importances["ssm_out"] = clipped_channel_sum(*(yk * gate for yk in ys), dim=-1)
        if "ssm_out_ungated" in want:
            importances["ssm_out_ungated"] = clipped_channel_sum(*ys, dim=-1)
        return out, importances


class PlainMambaLayer(nn.Module):
    """x + drop_path(mamba(norm(x))); L1's first layer adds a depthwise 3x3 conv + BN + GELU on the grid."""

    def __init__(self, embed_dims: int, grid: Tuple[int, int], with_dwconv: bool = False,
                 drop_path_rate: float = 0.0, **mamba_cfg):
        super().__init__()
        self.grid = tuple(grid)
        self.norm = nn.LayerNorm(embed_dims)
        self.with_dwconv = with_dwconv
        if with_dwconv:
            self.dw = nn.Sequential(nn.Conv2d(embed_dims, embed_dims, 3, padding=1, bias=False, groups=embed_dims),
                                    nn.BatchNorm2d(embed_dims), nn.GELU())
        self.mamba = PlainMamba2D(embed_dims, grid, **mamba_cfg)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: Optional[ScanContext] = None, want: AbstractSet[str] = frozenset()):
        mixed, importances = self.mamba(self.norm(x), ctx, want)
        mixed = self.drop_path(mixed) + x
        if self.with_dwconv:
            mixed = self._dwconv(mixed, None if ctx is None else ctx["grid_index"])
        return mixed, importances

    def _dwconv(self, x: torch.Tensor, grid_index: Optional[torch.Tensor]) -> torch.Tensor:
        conv, bn, act = self.dw
        if grid_index is None:  # official: (b, c, h*w) view of the output, then tokens
            y = self.dw(_to_grid(x, None, self.grid))
            return y.reshape(y.shape[0], y.shape[1], -1).permute(0, 2, 1)
        # conv on the zero-filled grid; BN on the kept tokens only (its batch statistics in training must
        # not see the zeros), then GELU
        y = _from_grid(conv(_to_grid(x, grid_index, self.grid)), grid_index)  # (b, T, C)
        y = bn(y.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return act(y)


class PlainMamba(TimmHeadMixin, TokenBackbone):
    """PlainMamba classifier: conv stem + pos-embed, plain Mamba layers, final LN, mean pooling, Linear.

    timm contract: forward_features gives the final-normed map (B, H, W, C) (output_fmt "NHWC": no CLS, so
    the tokens are a map), forward_head averages it (global_pool "avg") or returns it (""); the
    intermediates / features_only maps are the block outputs on the grid.
    """

    signals = {"hidden", *SSM_SIGNALS}
    reduction_point = "post"
    is_ssm = True
    has_cls = False
    num_protected = 0
    output_fmt = "NHWC"
    POOLS = ("avg", "")
    FINAL_NORM = "ln1"

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 24, num_convs_patch_embed: int = 1,
                 layers_with_dwconv: Sequence[int] = (), d_state: int = 16, expand: int = 2, conv_size: int = 7,
                 stem_chs: int = 64, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 final_norm_eps: float = 1e-6, global_pool: str = "avg"):
        super().__init__()
        if global_pool not in self.POOLS:
            raise ValueError(f"global_pool must be one of {self.POOLS}, got {global_pool!r}")
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.num_features = self.head_hidden_size = embed_dim
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.patch_embed = ConvPatchEmbed(img_size, in_chans, embed_dim, num_convs_patch_embed, patch_size,
                                          stem_chs)
        self.grid = tuple(self.patch_embed.grid_size)
        self.input_size = (in_chans, *self.patch_embed.img_size)
        num_patches = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.drop_after_pos = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linspace(0, r, depth)
        bad = [i for i in layers_with_dwconv if not 0 <= i < depth]
        if bad:
            raise ValueError(f"layers_with_dwconv {list(bad)} out of range for depth {depth}")
        self.layers = nn.ModuleList(
            PlainMambaLayer(embed_dim, self.grid, with_dwconv=i in set(layers_with_dwconv), drop_path_rate=rates[i],
                            d_state=d_state, expand=expand, conv_size=conv_size)
            for i in range(depth))
        self.ln1 = nn.LayerNorm(embed_dim, eps=final_norm_eps)  # the official final norm's name
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = 2 * self.patch_embed.kernel
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"layers.{i}")
                             for i in range(depth)]
        self._init_weights()

    def _init_weights(self):
        """The official training init: every Linear trunc-normal(0.02) with zero bias (the classifier-level
        init_cfg also covers in/x/dt/out_proj), LayerNorm 1/0, pos_embed trunc-normal(0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.pos_embed, std=0.02)

    @property
    def num_layers(self) -> int:
        return self.depth

    @property
    def norm(self) -> nn.LayerNorm:
        return self.ln1

    # -- timm contract ------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        """The official recipe's exclusions (paramwise_cfg custom_keys of plain_mamba_l*_in1k_300e.py):
        pos_embed, A_log, D, direction_Bs (norms and biases are excluded by their shape anyway)."""
        names = {"pos_embed"}
        for i in range(len(self.layers)):
            names |= {f"layers.{i}.mamba.{n}" for n in ("A_log", "D", "direction_Bs")}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^ln1", (99999,))])


    def _layer(self, i: int, *args):
        return run_layer(self.layers[i], self.grad_checkpointing, *args)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.drop_after_pos(self.patch_embed(images) + self.pos_embed)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed map (B, H, W, C): the token interface's ops written without TokenState, so that
        torch.fx traces it with the stem and the blocks as leaves."""
        x = self._tokens(images)
        for i in range(len(self.layers)):
            x = self._layer(i, x)[0]
        return tokens_to_map(self.ln1(x), self.grid, "NHWC")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.flatten(1, 2).mean(dim=1)  # over (B, H*W, C) as classify does: the same reduction order
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, images: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's forward_intermediates: the outputs of the chosen blocks as maps on the patch grid
        (norm=True applies the final LayerNorm to them)."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        x = self._tokens(images)
        intermediates = []
        last = max_index if (stop_early or intermediates_only) else len(self.layers) - 1
        for i in range(last + 1):
            x = self._layer(i, x)[0]
            if i in take:
                intermediates.append(tokens_to_map(self.ln1(x) if norm else x, self.grid, output_fmt))
        if intermediates_only:
            return intermediates
        return tokens_to_map(self.ln1(x), self.grid, "NHWC"), intermediates


    # -- token interface ----------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> TokenState:
        hw = tuple(images.shape[-2:])
        if self.patch_embed.out_size(hw) != self.grid:
            raise ValueError(f"{type(self).__name__} was built for {self.patch_embed.img_size[0]}x"
                             f"{self.patch_embed.img_size[1]} images (a {self.grid[0]}x{self.grid[1]} grid); got "
                             f"{hw[0]}x{hw[1]}. Create it with img_size={hw[0]} for another resolution.")
        return initial_state(self._tokens(images), self.grid, special=(), cls_at=None)

    def norm_tokens(self, state: TokenState) -> torch.Tensor:
        return self.ln1(state.x)

    def _scan_context(self, state: TokenState, gap: bool) -> Optional[ScanContext]:
        """Restricted orders and flat indices for the current tokens (cached in state.extras while pos is
        the same tensor); None when all H*W tokens are present and nothing was reduced (the official path)."""
        L = self.grid[0] * self.grid[1]
        if state.num_tokens == L and not state.extras.get("reduced"):
            return None
        cached = state.extras.get("plainmamba_scan")
        if cached is None or cached[0] is not state.pos:
            cached = (state.pos, self.scan_context(state.pos))
            state.extras = {**state.extras, "plainmamba_scan": cached}  # a new dict: never edit a shared one
        ctx = cached[1]
        if not gap:
            ctx = {**ctx, "scans": [s._replace(gaps=None) for s in ctx["scans"]]}
        return ctx

    def scan_context(self, pos: torch.Tensor) -> ScanContext:
        """What the blocks need to run on the tokens at raster positions pos (B, T): the four restricted
        scans (with gaps), and flat indices to visit them / put them back / place them on the grid."""
        mixer = self.layers[0].mamba
        T = pos.shape[1]
        tables = restricted_scan_tables(pos, mixer.order_inverse, mixer.order_labels)  # fields (4, B, T)
        # one launch per table for all four orders; the per-order lists hold views
        return {"pos": pos, "grid_index": flat_index(pos, self.grid[0] * self.grid[1]), "scans": per_order(tables),
                "visit": list(flat_index(tables.perm, T).unbind(0)),
                "unvisit": list(flat_index(tables.inverse, T).unbind(0)),
                "labels": tables.labels,  # one direction_Bs lookup
                # the fused path's index tables and decay scales 1 + gap of all four orders, (4, B, T) each
                "perm": tables.perm, "gap_scale": tables.gaps.float() + 1.0}

    def run_block(self, i: int, state: TokenState, hook=None) -> TokenState:
        needs = getattr(hook, "needs", set()) if hook is not None else set()
        want = needs & SSM_SIGNALS
        align = state.extras.get("align")
        if align not in (None, "gap", "mask"):
            raise ValueError(f"unknown alignment {align!r}; expected None, 'gap' or 'mask'")
        L = self.grid[0] * self.grid[1]
        if align == "mask" and state.num_tokens < L:
            out, importances = self._run_block_masked(i, state, want)
        else:
            ctx = self._scan_context(state, gap=align == "gap")
            out, importances = self._layer(i, state.x, ctx, want)
        state = state.with_tokens(x=out)
        if hook is None:
            return state
        return hook(state, {"hidden": out, **importances})

    def _run_block_masked(self, i: int, state: TokenState, want: AbstractSet[str]):
        """Masking alignment: the block runs on the full grid with zero hidden states at pruned positions."""
        L = self.grid[0] * self.grid[1]
        index = flat_index(state.pos, L)
        out, importances = self._layer(i, put(state.x, index, L), None, want)
        return take(out, index), {k: v.gather(1, state.pos) for k, v in importances.items()}

    def classify(self, state: TokenState) -> torch.Tensor:
        if self.global_pool != "avg":
            raise ValueError("global_pool='' gives unpooled features; the token interface needs 'avg'")
        h = self.ln1(state.x)
        size = state.size
        if size is None or not state.extras.get("merged"):  # a flag, not a read-back of the sizes
            pooled = h.mean(dim=1)
        else:  # merged tokens stand for several patches: size-weighted mean
            w = size.to(h.dtype).unsqueeze(-1)
            pooled = (h * w).sum(dim=1) / w.sum(dim=1)
        return self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[PlainMamba] = None,
                         use_ema_buffers: bool = False) -> Dict[str, torch.Tensor]:
    """Official mmcls keys -> ours: strip `backbone.`, `head.fc.` -> `head.`, drop mmcv EMA buffers.

    The official EMA hook stores the EMA weights as extra buffers `ema_<name with dots as underscores>`
    beside the weights; with use_ema_buffers=True they replace the weights they shadow.
    """
    ema = {k[len("ema_"):]: v for k, v in state_dict.items() if k.startswith("ema_")}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("ema_"):
            continue
        if use_ema_buffers:
            shadow = ema.get(key.replace(".", "_"))
            if shadow is None:
                if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    shadow = value  # buffers have no EMA copy
                else:
                    raise KeyError(f"use_ema=True but the file has no EMA copy of {key!r} "
                                   f"(expected a key 'ema_{key.replace('.', '_')}')")
            value = shadow
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = value
    return out
