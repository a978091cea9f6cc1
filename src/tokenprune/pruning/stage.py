"""A reduction stage (evaluator -> smoothing -> reducer -> alignment) and the model that runs a schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..compat import feature_take_indices
from ..models.timm_contract import tokens_to_map
from ..tokens import TokenState
from . import ops, reducers
from .evaluators import Evaluator

BEFORE_ENCODER = -1  # layer index of the one-step stage that runs between embedding and the first block


@dataclass
class StageTrace:
    """What one stage did in the last forward: token counts and the resulting per-token metadata."""
    layer: int
    tokens_in: int
    tokens_out: int
    pos: torch.Tensor
    size: torch.Tensor
    protected: torch.Tensor
    cls_index: Optional[int]


COUNT_RULES = {"round": ops.keep_count, "ceil": ops.keep_count_ceil, "even": ops.keep_count_even}


def count_tokens(n_free: int, keep: float, rule: str = "round") -> int:
    """Non-protected tokens kept from n_free at a keep ratio: round, ceil (EViT) or even (ToP's official code)."""
    if rule not in COUNT_RULES:
        raise ValueError(f"unknown count rule {rule!r}; expected one of {sorted(COUNT_RULES)}")
    return COUNT_RULES[rule](n_free, keep)


class ReductionStage(nn.Module):
    def __init__(self, layer: int, keep: float, evaluator: Optional[Evaluator], reducer: str,
                 smoothing: int = 1, border: str = "zero", smoothing_kind: str = "mean",
                 alignment: Optional[str] = None, is_ssm: bool = False, count_rule: str = "round",
                 reducer_options: Optional[dict] = None):
        super().__init__()
        if smoothing < 1 or smoothing % 2 == 0:
            raise ValueError(f"smoothing kernel size must be an odd integer >= 1, got {smoothing!r}")
        count_tokens(1, keep)  # validates the ratio
        self.layer, self.keep, self.evaluator = layer, keep, evaluator
        self.reducer_name, self.reduce = reducer, reducers.get_reducer(reducer)
        self.smoothing, self.border, self.smoothing_kind = smoothing, border, smoothing_kind
        self.alignment, self.is_ssm, self.count_rule = alignment, is_ssm, count_rule
        self.reducer_options = dict(reducer_options or {})
        self.needs = set(evaluator.needs if evaluator is not None else set()) | reducers.signals_for(
            reducer, self.reducer_options.get("metric"))
        self.trace: Optional[List] = None  # set by PrunedModel: one StageTrace per run of this stage
        self.record: Optional[List] = None  # set by PrunedModel when kept patches are recorded

    def target(self, n_free: int) -> int:
        return count_tokens(n_free, self.keep, self.count_rule)

    def out_tokens(self, n_tokens: int, n_protected: int) -> int:
        """Token count after this stage, without running it (for budget solving and tests)."""
        n_free = n_tokens - n_protected
        kept = self.target(n_free)
        if self.reducer_name == "tome":  # ToMe merges at most |A| - protected and at most half the free tokens
            kept = max(kept, n_free - min((n_tokens + 1) // 2 - n_protected, n_free // 2))
        return n_protected + kept + (1 if self.reducer_name == "evit" else 0)

    def forward(self, state: TokenState, signals: Dict[str, torch.Tensor]) -> TokenState:
        n_in = state.num_tokens
        scores = self.evaluator(state, signals) if self.evaluator is not None else None
        if scores is not None and self.smoothing > 1:
            scores = reducers.smooth(state, scores, self.smoothing, self.border, self.smoothing_kind)
        state = self.reduce(state, scores, signals, keep=self.target(reducers.n_free(state)),
                            **self.reducer_options)
        if self.is_ssm:
            state = reducers.set_alignment(reducers.restore_scan_order(state), self.alignment)
        state.extras["reduced"] = True
        if self.reducer_name != "prune":  # tokens may stand for several patches (size-weighted pooling)
            state.extras["merged"] = True
        if self.trace is not None:
            self.trace.append(StageTrace(self.layer, n_in, state.num_tokens, state.pos.detach(),
                                         state.size.detach(), state.protected.detach(), state.cls_index))
        if self.record is not None:
            self.record.append((self.layer, state.patch_index().detach().cpu()))
        return state


class PrunedModel(nn.Module):
    """A backbone run with reduction stages at the points of a schedule; forward(images) -> logits."""

    def __init__(self, backbone: nn.Module, stages: List[ReductionStage], method: Optional[str] = None,
                 proposal: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.stages = nn.ModuleList(sorted(stages, key=lambda s: s.layer))
        self.method = method
        layers = [s.layer for s in self.stages]
        if len(set(layers)) != len(layers):
            raise ValueError(f"two reduction stages at the same layer: {layers}")
        for s in self.stages:
            if not BEFORE_ENCODER <= s.layer < backbone.num_layers:
                raise ValueError(f"reduction layer {s.layer} out of range for a {backbone.num_layers}-block "
                                 f"backbone (use -1 for before the encoder)")
        self.token_trace: List = []
        self.kept_patches: Optional[List] = None
        self.trace_tokens = True  # per-stage StageTrace records (off when compiled / captured)
        self.compile_mode = "none"
        self._runner = None

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def record_kept_patches(self, on: bool = True) -> None:
        self.kept_patches = [] if on else None

    def set_compile(self, mode: Optional[str] = "none", **compile_kwargs) -> "PrunedModel":
        """Run the forward eagerly ("none"), through torch.compile ("compile"; `compile_kwargs` go to it,
        e.g. backend, fullgraph) or replayed from CUDA graphs at inference ("cudagraph"); see
        tokenprune.pruning.capture. Token traces are off unless eager."""
        from .capture import CudaGraphRunner, check_mode
        mode = check_mode(mode)
        self.compile_mode = mode
        self.trace_tokens = mode == "none"
        self.token_trace = []
        if mode == "compile":
            self._runner = torch.compile(self._forward, **{"dynamic": False, **compile_kwargs})
        elif mode == "cudagraph":
            self._runner = CudaGraphRunner(self._forward)
        else:
            self._runner = None
        return self

    def _apply(self, fn, *args, **kwargs):
        runner = self.__dict__.get("_runner")
        if hasattr(runner, "reset"):
            runner.reset()  # captured graphs point at the old weights
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copies and pickles rebuild the compiled / captured runner lazily
        state = dict(super().__getstate__())
        state["_runner"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if state.get("compile_mode", "none") != "none":
            self.set_compile(state["compile_mode"])

    def _schedule(self):
        """Fresh traces and the (hooks by block, before-encoder step) of this forward."""
        self.token_trace = [] if self.trace_tokens else None
        if self.kept_patches is not None:
            self.kept_patches = []
        for s in self.stages:
            s.trace, s.record = self.token_trace, self.kept_patches
        hooks = {s.layer: s for s in self.stages if s.layer != BEFORE_ENCODER}
        first = next((s for s in self.stages if s.layer == BEFORE_ENCODER), None)
        before = None if first is None else (lambda state, imgs: first(state, {"images": imgs}))
        return hooks, before

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._runner is not None:
            return self._runner(images)
        return self._forward(images)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        hooks, before = self._schedule()
        return self.backbone.forward_tokens(images, hooks=hooks, before=before)

    def forward_intermediates(self, images: torch.Tensor, indices: Union[int, List[int], None] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              fill_value: float = 0.0):
        """timm's forward_intermediates for a pruned model: feature maps on the original patch grid.

        The map of block i holds the tokens that leave block i (after that block's reduction stage, if it
        has one), each at its original grid position; a position whose patch was pruned, or merged into
        another token, holds `fill_value` (0 by default); a merged token (ToMe, UTR, PuMer) sits at the
        position of the token it was kept as. Tokens without a grid position (CLS, registers, EViT's fused
        token) are left out. norm=True applies the backbone's final norm. Returns (final-normed map, maps),
        or only the maps with intermediates_only (then the blocks after the last index are not run).
        """
        bb = self.backbone
        take, max_index = feature_take_indices(bb.num_layers, indices)
        hooks, before = self._schedule()
        state = bb.embed(images)
        if before is not None:
            state = before(state, images)

        def grid_map(tokens):
            return tokens_to_map(state.scatter_to_grid(tokens, fill_value), state.grid, output_fmt)

        maps = []
        for i in range(max_index + 1 if intermediates_only else bb.num_layers):
            state = bb.run_block(i, state, hooks.get(i))
            if i in take:
                maps.append(grid_map(bb.norm_tokens(state) if norm else bb.hidden_tokens(state)))
        if intermediates_only:
            return maps
        return grid_map(bb.norm_tokens(state)), maps

    def forward_features(self, images: torch.Tensor, output_fmt: str = "NCHW", fill_value: float = 0.0):
        """The final-normed tokens of the pruned model as a map on the patch grid (see forward_intermediates
        for what sits at pruned positions)."""
        return self.forward_intermediates(images, indices=1, output_fmt=output_fmt, fill_value=fill_value)[0]

    def tokens_per_block(self) -> List[int]:
        """Tokens entering each block (after a mid-block reduction, the tokens its MLP sees), simulated."""
        bb = self.backbone
        n_tokens = bb.seq_len
        n_prot = bb.num_protected
        by_layer = {s.layer: s for s in self.stages}
        if BEFORE_ENCODER in by_layer:
            n_tokens = by_layer[BEFORE_ENCODER].out_tokens(n_tokens, n_prot)
        counts = []
        for i in range(bb.num_layers):
            if i in by_layer and bb.reduction_point == "mid":
                n_tokens = by_layer[i].out_tokens(n_tokens, n_prot)
            counts.append(n_tokens)
            if i in by_layer and bb.reduction_point == "post":
                n_tokens = by_layer[i].out_tokens(n_tokens, n_prot)
        return counts

    def token_reduction(self) -> float:
        """1 - (tokens summed over blocks) / (unpruned tokens summed over blocks)."""
        counts = self.tokens_per_block()
        if not counts:  # a plain classifier has no token blocks
            return 0.0
        return 1.0 - sum(counts) / (self.backbone.seq_len * len(counts))
