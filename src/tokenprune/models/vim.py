"""Vision Mamba (hustvl/Vim), checkpoint-compatible: middle CLS, bidirectional "v2" mixer, fp32 residual.

Parameter names and shapes are those of the official hustvl/Vim state dict (docs/CONVENTIONS.md, "Checkpoints"),
so official files load strictly with no key renamed.
The mixer also supports the two hidden-state alignments used after pruning (see `align` in TokenState.extras).
"""
from __future__ import annotations

import math
from typing import AbstractSet, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from ..compat import feature_take_indices, version_counter
from torch import nn

from ..tokens.sequence import gap_scale, gap_scaled_delta_B, gather_from_sequence, scatter_to_sequence
from ..tokens.state import TokenState, initial_state
from ..ssm import selective_scan
from ..ssm.fused_norm import add_rms_norm
from ..ssm.fused_ops import conv1d_silu, fused_selective_scan
from ..ssm.scan import _record, on_triton
from .base import SSM_SIGNALS, TokenBackbone, clipped_channel_sum
from .timm_contract import TimmHeadMixin, run_layer, tokens_to_map


class RMSNorm(nn.Module):
    """Weight-only RMSNorm computed in fp32 (mamba-ssm's RMSNorm semantics, eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(x.dtype)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype where autocast is on for this device type, else None (also for types autocast does
    not know, such as meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _fused_add_norm(norm: RMSNorm, h: torch.Tensor, residual: Optional[torch.Tensor],
                    out_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
    """add_norm on the fused kernel; by default the output is in the autocast dtype when autocast is on."""
    if out_dtype is None:
        out_dtype = autocast_dtype(h.device.type) or norm.weight.dtype
    return add_rms_norm(h, residual, norm.weight, norm.eps, out_dtype)


def add_norm(norm: RMSNorm, h: torch.Tensor, residual: Optional[torch.Tensor],
             out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + h), residual + h in fp32), the official pre-norm step (residual None: the first block).

    Where the scan runs on Triton (GPUs, and `meta` tensors) the add and the norm are one fused kernel
    (ssm/fused_norm.py) whose output is already in the dtype the mixer's matmul takes under autocast (the same
    rounding the matmul's cast would apply); elsewhere the ops of the official code, in fp32."""
    fused = on_triton(h, _fused_add_norm, norm, h, residual, out_dtype)
    if fused is not None:
        return fused
    residual = h if residual is None else residual + h
    return norm(residual.to(norm.weight.dtype)), residual.float()


def _causal_conv_silu(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Causal depthwise conv: pad on the left only, so no output beyond L is computed and thrown away."""
    x = F.pad(x, (conv.kernel_size[0] - 1, 0))
    return F.silu(F.conv1d(x, conv.weight, conv.bias, groups=conv.groups))


def _gap_scaled(delta: torch.Tensor, Bm: torch.Tensor, bias: torch.Tensor, gap: torch.Tensor):
    """Gap-aware decay with a standard kernel: Δ' = (1+g)·softplus(Δ+b), B' = B/(1+g) keeps Δ'B' = ΔB."""
    # softplus first: the rescaling is exact only after it; results stay in the inputs' dtypes, which
    # mamba-ssm's kernel wants under mixed precision
    delta = F.softplus(delta.float() + bias.float()[None, :, None]).to(delta.dtype)
    return gap_scaled_delta_B(delta, Bm, gap)


class DirectionScope(nn.Module):
    """Parameter-free scope around one scan direction, so FLOP counts can be read per direction
    (the ViM paper counts one direction); it holds no weights and leaves the state dict unchanged."""

    def forward(self, fn, *args):
        return fn(*args)


def _graph_building() -> bool:
    """Tracing (fvcore), compiling or capturing a CUDA graph: compute every tensor in the graph, cache nothing."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def stacked_weights(module: nn.Module, names: Tuple[str, str], like: torch.Tensor) -> torch.Tensor:
    """torch.stack of two directions' weights (attribute paths of `module`), for one batched matmul with `like`.

    Without a gradient to record, the stack (cast to the autocast dtype under autocast) is cached on the
    module, keyed by device, dtype, storage and version counter of each weight (python attributes: no device
    read-back), so inference launches neither the stack nor autocast's cast per block and forward."""
    weights = [module.get_submodule(n.rsplit(".", 1)[0]).get_parameter(n.rsplit(".", 1)[1]) for n in names]
    dtype = autocast_dtype(like.device.type) or weights[0].dtype
    if (torch.is_grad_enabled() and any(w.requires_grad for w in weights)) or _graph_building():
        return torch.stack(weights)
    key = tuple((w.device, w.dtype, w.data_ptr(), version_counter(w)) for w in weights)
    cache = module.__dict__.setdefault("_stacked_cache", {})  # not a buffer: never in the state dict
    hit = cache.get((names, dtype))  # one entry per dtype: fp32 and autocast runs can alternate
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable by a later training step
            hit = (key, torch.stack(weights).to(dtype))
        cache[(names, dtype)] = hit
    return hit[1]


class BiMambaMixer(nn.Module):
    """ViM "v2" bidirectional mixer: out_proj((y_fwd + flip(y_bwd)) / 2), both gated by silu(z)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        super().__init__()
        self.dim, self.d_state = dim, d_state
        self.d_inner = expand * dim
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=True))
            setattr(self, "x_proj" + suffix, nn.Linear(E, R + 2 * N, bias=False))
            dt_proj = nn.Linear(R, E, bias=True)
            nn.init.uniform_(dt_proj.weight, -R ** -0.5, R ** -0.5)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            setattr(self, "dt_proj" + suffix, dt_proj)
            A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1)
            setattr(self, "A_log" if not suffix else "A_b_log", nn.Parameter(A_log))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(E)))
        self.out_proj = nn.Linear(E, dim, bias=False)
        self.scan_fwd, self.scan_bwd = DirectionScope(), DirectionScope()

    def _direction(self, x, z, suffix: str, gap: Optional[torch.Tensor]):
        conv, x_proj, dt_proj = (getattr(self, n + suffix) for n in ("conv1d", "x_proj", "dt_proj"))
        A_log, D = (self.A_log, self.D) if not suffix else (self.A_b_log, self.D_b)
        u = _causal_conv_silu(x, conv)  # (b, E, L)
        # channels-first products (W @ u) give the (b, C, L) layout the scan reads, without transposed copies;
        # functional calls keep every op of this direction inside its DirectionScope for FLOP attribution
        dbl = torch.matmul(x_proj.weight, u)  # (b, R + 2N, L)
        dt, Bm, Cm = dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.matmul(dt_proj.weight, dt)  # (b, E, L); the bias goes inside the softplus, in the scan
        A = -torch.exp(A_log.float())
        if gap is None:
            return selective_scan(u, delta, A, Bm, Cm, D.float(), z, delta_bias=dt_proj.bias.float(),
                                  delta_softplus=True)
        delta, Bm = _gap_scaled(delta, Bm, dt_proj.bias, gap)
        return selective_scan(u, delta, A, Bm, Cm, D.float(), z, delta_softplus=False)

    def forward(self, h: torch.Tensor, gaps: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                want: AbstractSet[str] = frozenset()):
        """Mixer output (b, L, D) and the SSM importances named in ``want`` (each (b, L), token order)."""
        fused = None if want else on_triton(h, self._forward_fused, h, gaps)
        if fused is not None:
            return fused, {}
        h_t = h.transpose(1, 2)  # (b, D, L)
        w_x, w_z = self.in_proj.weight.chunk(2, dim=0)  # official split of in_proj: x first, then z
        x, z = torch.matmul(w_x, h_t), torch.matmul(w_z, h_t)  # (b, E, L) each, contiguous
        gap_f, gap_b = gaps if gaps is not None else (None, None)
        ungated = "ssm_out_ungated" in want  # the scan output before the silu(z) gate: gate applied here
        y_f = self.scan_fwd(self._direction, x, None if ungated else z, "", gap_f)
        y_b = self.scan_bwd(self._direction, x.flip(-1), None if ungated else z.flip(-1), "_b",
                            None if gap_b is None else gap_b.flip(-1))
        y_b = y_b.flip(-1)
        importances = {}
        if ungated:
            importances["ssm_out_ungated"] = clipped_channel_sum(y_f, y_b)
            gate = F.silu(z)
            y_f, y_b = y_f * gate, y_b * gate
        if "ssm_out" in want:
            importances["ssm_out"] = clipped_channel_sum(y_f, y_b)
        out = self.out_proj(((y_f + y_b) / 2).transpose(1, 2))
        return out, importances

    def _forward_fused(self, h: torch.Tensor, gaps: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Both directions through the fused Triton ops, in the channel-major (E, b·L) layout: every projection
        is one plain 2-D matmul (no transposed copies), the conv runs causal and anti-causal in one launch,
        and the scan walks direction 1 backwards by index (no flips), adding it before the shared gate.
        Under autocast the activations stay bf16/fp16 end to end; A, D, biases and the states stay fp32."""
        if not torch.compiler.is_compiling():
            _record("triton")  # scan_impl_report() tells which scan ran
        b, L, dim = h.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        xz = torch.mm(self.in_proj.weight, h.reshape(b * L, dim).t()).view(2 * E, b, L)
        x, z = xz[:E].transpose(0, 1), xz[E:].transpose(0, 1)  # (b, E, L) views of the (E, b, L) layout
        u = conv1d_silu(x, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight, self.conv1d_b.bias)
        u_cm = u.transpose(1, 2).reshape(2, E, b * L)  # a view: u is laid out (2, E, b, L)
        dbl = torch.bmm(stacked_weights(self, ("x_proj.weight", "x_proj_b.weight"), u_cm), u_cm)  # (2, R+2N, b·L)
        dt = torch.bmm(stacked_weights(self, ("dt_proj.weight", "dt_proj_b.weight"), u_cm), dbl[:, :R])  # (2, E, b·L)

        def bel(t, rows):  # (2, rows, b·L) -> (2, b, rows, L) view
            return t.view(2, rows, b, L).transpose(1, 2)
        gap = None
        if gaps is not None:  # decay scale 1 + g per token, token order for both directions
            gap = torch.stack([gap_scale(g) for g in gaps])
        bc = dbl[:, R:].float()  # B and C in fp32 in one cast (fused_selective_scan would cast each)
        y = fused_selective_scan(u, bel(dt, E), self.A_log, bel(bc[:, :N], N), bel(bc[:, N:], N),
                                 self.D, z, self.dt_proj.bias, A1=self.A_b_log, D1=self.D_b,
                                 bias1=self.dt_proj_b.bias, gap=gap, softplus=True, a_is_log=True)
        out = torch.mm(y.transpose(0, 1).reshape(E, b * L).t(), self.out_proj.weight.t())  # y is (E, b, L)
        return out.view(b, L, dim)


class VimBlock(nn.Module):
    """Pre-norm block with the official residual convention: returns (mixer output, fp32 residual)."""

    def __init__(self, dim: int, drop_path: float = 0.0, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, h, residual, gaps=None, want: AbstractSet[str] = frozenset()):
        h, residual = add_norm(self.norm, h if residual is None else self.drop_path(h), residual)
        out, importances = self.mixer(h, gaps=gaps, want=want)
        return out, residual, importances


class VisionMamba(TimmHeadMixin, TokenBackbone):
    """ViM with the token interface and timm's model contract.

    forward_features gives the final-normed token sequence (B, N + 1, D) with the CLS at `cls_position`
    (timm's ViT convention: tokens, not a map); forward_head reads the CLS out (global_pool "token", the
    official read-out) or averages the patch tokens ("avg"); forward_intermediates / features_only give
    the residual stream after the chosen blocks as maps on the patch grid, CLS removed.
    """

    signals = {"hidden", *SSM_SIGNALS}
    reduction_point = "post"
    is_ssm = True
    has_cls = True
    num_protected = 1
    POOLS = ("token", "avg", "")
    FINAL_NORM = "norm_f"

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 24, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "token", **_ignored):
        super().__init__()
        if global_pool not in self.POOLS:
            raise ValueError(f"global_pool must be one of {self.POOLS}, got {global_pool!r}")
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.num_features = self.head_hidden_size = embed_dim
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.grid = tuple(self.patch_embed.grid_size)
        num_patches = self.patch_embed.num_patches
        self.cls_position = num_patches // 2  # official: token_position = M // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rule
        self.layers = nn.ModuleList(VimBlock(embed_dim, rates[i], d_state=d_state, expand=expand, d_conv=d_conv)
                                    for i in range(depth))
        self.norm_f = RMSNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"layers.{i}")
                             for i in range(depth)]
        self._init_weights()

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:  # mamba's prenorm-residual rescaling of the output projection
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.depth)

    @property
    def num_layers(self) -> int:
        return self.depth

    # -- timm contract ------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        """The official recipe's exclusions: pos_embed and cls_token (VisionMamba.no_weight_decay) and the
        SSM parameters mamba-ssm flags `_no_weight_decay` (A_log, A_b_log, D, D_b of every mixer)."""
        names = {"pos_embed", "cls_token"}
        for i, layer in enumerate(self.layers):
            names |= {f"layers.{i}.mixer.{n}" for n in ("A_log", "A_b_log", "D", "D_b")}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None),
                                                                       (r"^norm_f", (99999,))])

    def _layer(self, i: int, *args, **kwargs):
        return run_layer(self.layers[i], self.grad_checkpointing, *args, **kwargs)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        c = self.cls_position
        x = torch.cat([x[:, :c], self.cls_token.expand(x.shape[0], -1, -1), x[:, c:]], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _final_norm(self, h: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        h = h if residual is None else self.layers[-1].drop_path(h)
        return add_norm(self.norm_f, h, residual, out_dtype=self.norm_f.weight.dtype)[0]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens (B, N + 1, D), CLS at `cls_position` (the same ops as the token interface,
        written without TokenState so that torch.fx can trace it with the blocks as leaves)."""
        h, residual = self._tokens(images), None
        for i in range(len(self.layers)):
            out = self._layer(i, h, residual)
            h, residual = out[0], out[1]
        return self._final_norm(h, residual)

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cls_position
        return torch.cat([x[:, :c], x[:, c + 1:]], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, self.cls_position]
        elif self.global_pool == "avg":
            x = self._patch_tokens(x).mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, images: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's forward_intermediates: the residual stream after the chosen blocks (residual + block
        output: the hidden state the next block normalises; norm=True applies norm_f to it), CLS removed,
        as maps on the patch grid (output_fmt NCHW or NHWC); return_prefix_tokens gives (map, CLS) pairs."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        h, residual = self._tokens(images), None
        intermediates = []
        last = max_index if (stop_early or intermediates_only) else len(self.layers) - 1
        for i in range(last + 1):
            out = self._layer(i, h, residual)
            h, residual = out[0], out[1]
            if i in take:
                state = (residual + h).to(h.dtype)
                if norm:
                    state = self.norm_f(state)
                spatial = tokens_to_map(self._patch_tokens(state), self.grid, output_fmt)
                intermediates.append((spatial, state[:, self.cls_position]) if return_prefix_tokens else spatial)
        if intermediates_only:
            return intermediates
        return self._final_norm(h, residual), intermediates


    # -- token interface ----------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> TokenState:
        x = self._tokens(images)
        c = self.cls_position
        return initial_state(x, self.grid, special=(c,), cls_at=c)

    def hidden_tokens(self, state: TokenState) -> torch.Tensor:
        """The residual stream of the current tokens (what forward_intermediates returns per block)."""
        return state.x if state.residual is None else (state.residual + state.x).to(state.x.dtype)

    def norm_tokens(self, state: TokenState) -> torch.Tensor:
        return self._final_norm(state.x, state.residual)

    def run_block(self, i: int, state: TokenState, hook=None) -> TokenState:
        needs = getattr(hook, "needs", set()) if hook is not None else set()
        align = state.extras.get("align")
        gaps = state.extras.get("gaps") if align == "gap" else None
        if align == "mask":
            return self._run_block_masked(i, state, hook, needs)
        out, residual, importances = self._layer(i, state.x, state.residual, gaps=gaps, want=needs & SSM_SIGNALS)
        state = state.with_tokens(x=out, residual=residual)
        if hook is None:
            return state
        return hook(state, {"hidden": out, **importances})

    def _run_block_masked(self, i, state, hook, needs):
        """Masking alignment: pruned positions stay in the scan with zero input (exact decay, no speed-up)."""
        pos = state.pos

        def scatter(t):
            return None if t is None else scatter_to_sequence(t, pos, state.seq_len)

        out, residual, importances = self._layer(i, scatter(state.x), scatter(state.residual),
                                                 want=needs & SSM_SIGNALS)
        out, residual = gather_from_sequence(out, pos), gather_from_sequence(residual, pos)
        state = state.with_tokens(x=out, residual=residual)
        if hook is None:
            return state
        return hook(state, {"hidden": out, **{k: v.gather(1, pos) for k, v in importances.items()}})

    def classify(self, state: TokenState) -> torch.Tensor:
        h = self.norm_tokens(state)
        if self.global_pool == "token":
            return self.head(h[:, state.cls_index])
        if self.global_pool == "avg":  # merged tokens stand for `size` patches: size-weighted mean
            weight = (state.size * (~state.protected)).unsqueeze(-1).to(h.dtype)
            return self.head((h * weight).sum(1) / weight.sum(1))
        raise ValueError("global_pool='' gives unpooled features; the token interface needs 'token' or 'avg'")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionMamba) -> Dict[str, torch.Tensor]:
    """Official ViM files already use our key names: nothing is renamed or dropped, so any key that does not
    fit is reported by the strict load."""
    return state_dict
