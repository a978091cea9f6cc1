"""Named methods (presets of evaluator, smoothing, reducer, alignment, schedule) and `create_model`.

A preset gives defaults per backbone family; every field can be overridden by keyword, so an ablation is one
argument (or one config line) away: create_model("vim_small_patch16_224", "papr_ss", keep=0.6, smoothing=5).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Union

import timm
from torch import nn

from ..models.base import TokenBackbone
from ..models.proposal import build_proposal
from ..models.vit import TimmViT
from .evaluators import build_evaluator
from .stage import BEFORE_ENCODER, PrunedModel, ReductionStage


@dataclass(frozen=True)
class MethodSpec:
    evaluator: Optional[Dict[str, str]]  # per family ("vit" / "ssm"), or None (ToMe needs no scores)
    reducer: str
    schedule: str  # named schedule, resolved against the backbone depth (see resolve_schedule)
    smoothing: int = 1
    alignment: Optional[str] = None
    count_rule: str = "round"
    metric: Dict[str, str] = field(default_factory=dict)  # merge similarity signal per family
    families: Sequence[str] = ("vit", "ssm")
    needs_cls: bool = False  # EViT appends a fused token beside a CLS that reads out the class
    doc: str = ""


ATTN_OR_CLS = {"vit": "cls_attn", "ssm": "cls_similarity"}
METHODS: Dict[str, MethodSpec] = {
    "random": MethodSpec({"vit": "random", "ssm": "random"}, "prune", "embed", doc="random patches, one step"),
    "l2": MethodSpec({"vit": "l2", "ssm": "l2"}, "prune", "embed", doc="L2 norm of patch embeddings, one step"),
    "evit": MethodSpec(ATTN_OR_CLS, "evit", "thirds", count_rule="ceil", needs_cls=True,
                       doc="EViT: keep by CLS attention (CLS similarity on SSMs), fuse the rest into one token"),
    "tome": MethodSpec(None, "tome", "every", metric={"vit": "keys", "ssm": "hidden"},
                       doc="ToMe bipartite merging with proportional attention"),
    "pumer": MethodSpec(ATTN_OR_CLS, "pumer", "thirds", metric={"vit": "keys", "ssm": "hidden"},
                        doc="PuMer (vision-only): prune half the budget by importance, ToMe-merge the rest"),
    "utr": MethodSpec({"vit": "cls_attn", "ssm": "ssm_out"}, "utr", "thirds",
                      metric={"vit": "keys", "ssm": "hidden"},
                      doc="UTR: prune the least important, merge the next into similar kept tokens"),
    "top": MethodSpec({"ssm": "ssm_out"}, "prune", "thirds", families=("ssm",), count_rule="even",
                      doc="ToP importance (clipped SSM output) pruning in the layers, no alignment"),
    "hsa": MethodSpec({"ssm": "ssm_out"}, "prune", "thirds", alignment="gap", families=("ssm",), count_rule="even",
                      doc="ToP importance + pruning-aware hidden-state alignment (gap-aware decay)"),
    "papr": MethodSpec({"vit": "papr", "ssm": "papr"}, "prune", "embed",
                       doc="PaPr: proposal ConvNet scores, one step before the encoder"),
    "papr_ss": MethodSpec({"vit": "papr", "ssm": "papr"}, "prune", "embed", smoothing=3,
                          doc="PaPr + score smoothing (k x k mean filter on the score map)"),
    "visionzip": MethodSpec({"vit": "cls_attn"}, "visionzip", "quarter", families=("vit",),
                            doc="VisionZip: dominant tokens by attention + contextual merge by key similarity"),
}


def list_methods() -> List[str]:
    return sorted(METHODS)


def family_of(backbone: nn.Module) -> str:
    """The preset family of a backbone: "ssm" (ViM, PlainMamba) or "vit"."""
    return "ssm" if backbone.is_ssm else "vit"


def inapplicable_reason(method: str, backbone: nn.Module) -> Optional[str]:
    """Why a preset cannot run on a backbone (None when it can); unknown names are create_model's error."""
    spec = METHODS.get(method)
    if spec is None:
        return None
    family = family_of(backbone)
    if family not in spec.families:
        return (f"method {method!r} is defined for {list(spec.families)} backbones, not "
                f"{type(backbone).__name__} ({family}): {spec.doc}")
    if spec.needs_cls and not backbone.has_cls:
        return f"method {method!r} needs a CLS token; {type(backbone).__name__} has none"
    return None


def resolve_schedule(schedule: Union[str, Sequence[int]], depth: int, reduction_point: str) -> List[int]:
    """Block indices (0-based, -1 = before the encoder) for a named schedule at this depth.

    embed: one step before the first block (PaPr, naive pruning).
    thirds: EViT's 4th/7th/10th blocks of DeiT-S (mid-block, depth/4 steps); on SSMs ToP's "after layers
            5, 10, 15" of a 24-layer ViM (after blocks 5, 10, 15 counted from 1), scaled to the depth.
    quarter: one stage at depth/4 (VisionZip in a classifier).  every: all blocks (ToMe).
    """
    if not isinstance(schedule, str):
        return [int(i) for i in schedule]
    if schedule == "embed":
        return [BEFORE_ENCODER]
    if schedule == "every":
        return list(range(depth))
    if schedule == "quarter":
        return [max(0, round(depth / 4))]
    if schedule == "thirds":
        if reduction_point == "mid":
            return sorted({min(depth - 1, round(depth * k / 4)) for k in (1, 2, 3)})
        return sorted({max(0, round(depth * k / 24) - 1) for k in (5, 10, 15)})
    raise ValueError(f"unknown schedule {schedule!r}; expected embed, thirds, quarter, every or a list of ints")


def as_backbone(backbone: Union[str, nn.Module], allow_plain: bool = False, **model_kwargs) -> nn.Module:
    """A TokenBackbone from a timm name or module (timm ViTs are wrapped)."""
    if isinstance(backbone, str):
        if backbone not in timm.list_models() and backbone not in timm.list_models(pretrained=False):
            raise ValueError(f"unknown backbone {backbone!r}; tokenprune registers "
                             f"{sorted(n for n in timm.list_models() if n.startswith(('vim_', 'plainmamba')))} "
                             "and timm VisionTransformer models (that class itself; subclasses are not supported)")
        backbone = timm.create_model(backbone, **model_kwargs)
    if isinstance(backbone, TokenBackbone):
        return backbone
    if isinstance(backbone, nn.Module) and type(backbone).__name__ == "VisionTransformer":
        return TimmViT(backbone)
    if not allow_plain or not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(backbone).__name__} has no token interface (ViM, PlainMamba or a timm ViT "
                        "expected); only method=None can run it")
    return PlainClassifier(backbone)


class PlainClassifier(nn.Module):
    """A classifier without token interface (e.g. the PaPr proposal ConvNet), run as is: no reduction."""

    is_ssm, has_cls, num_layers, num_protected, seq_len, reduction_point = False, False, 0, 0, 1, "post"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = getattr(model, "num_classes", None)

    def forward_tokens(self, images, hooks=None, before=None):
        return self.model(images)


def create_model(backbone: Union[str, nn.Module], method: Optional[str] = None, keep: float = 1.0, *,
                 layers: Union[str, Sequence[int], None] = None, evaluator: Optional[str] = None,
                 reducer: Optional[str] = None, smoothing: Optional[int] = None, border: str = "zero",
                 smoothing_kind: str = "mean", alignment: Optional[str] = "default",
                 proposal: Union[str, nn.Module, None] = None, proposal_checkpoint: Optional[str] = None,
                 seed: int = 0, model_kwargs: Optional[dict] = None, compile: str = "none",
                 proposal_size: Optional[int] = None, **reducer_options) -> PrunedModel:
    """Backbone (timm name or module) + pruning method at a per-stage keep ratio -> PrunedModel.

    keep is the fraction of non-protected tokens each stage keeps (EViT rounds up, others to nearest).
    keep=1.0, or method=None, gives the unpruned backbone exactly (no stage is built).
    compile: "none" (eager), "compile" (torch.compile) or "cudagraph" (CUDA-graph replay at inference);
    see tokenprune.pruning.capture.
    proposal_size: run the PaPr proposal on images resized to this side (pixels); None: the input as given.
    """
    from .capture import check_mode
    check_mode(compile)
    return _create_model(backbone, method, keep, layers=layers, evaluator=evaluator, reducer=reducer,
                         smoothing=smoothing, border=border, smoothing_kind=smoothing_kind, alignment=alignment,
                         proposal=proposal, proposal_checkpoint=proposal_checkpoint, seed=seed,
                         model_kwargs=model_kwargs, proposal_size=proposal_size,
                         **reducer_options).set_compile(compile)


def _create_model(backbone, method, keep, *, layers, evaluator, reducer, smoothing, border, smoothing_kind,
                  alignment, proposal, proposal_checkpoint, seed, model_kwargs, proposal_size=None,
                  **reducer_options) -> PrunedModel:
    bb = as_backbone(backbone, allow_plain=method is None, **(model_kwargs or {}))
    if method is None or keep == 1.0:
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {list_methods()}")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {keep!r}")
        return PrunedModel(bb, [], method=method)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list_methods()}")
    reason = inapplicable_reason(method, bb)
    if reason:
        raise ValueError(reason)
    spec = METHODS[method]
    family = family_of(bb)
    spec = replace(spec, smoothing=spec.smoothing if smoothing is None else smoothing,
                   alignment=spec.alignment if alignment == "default" else alignment,
                   reducer=reducer or spec.reducer)
    ev_name = evaluator or (spec.evaluator or {}).get(family)
    # a CLS-based evaluator on a backbone without a CLS scores with a stand-in; the run says so (warning) and
    # the model records it (`evaluator_substitution`), so a report row can name the scorer that really ran
    requested = ev_name
    if ev_name == "cls_attn" and not bb.has_cls:
        ev_name = "attn_received"
    if ev_name == "cls_similarity" and not bb.has_cls:
        ev_name = "l2"
    substitution = None
    if ev_name != requested:
        substitution = {"requested": requested, "used": ev_name,
                        "reason": f"{type(bb).__name__} has no CLS token"}
        warnings.warn(f"method {method!r}: evaluator {requested!r} needs a CLS token and {type(bb).__name__} has "
                      f"none; its tokens are scored by {ev_name!r} instead", UserWarning, stacklevel=3)
    if spec.alignment is not None:
        if not bb.is_ssm:
            raise ValueError(f"alignment={spec.alignment!r} applies to SSM backbones only, not {type(bb).__name__}")
        if spec.alignment not in ("mask", "gap"):
            raise ValueError(f"unknown alignment {spec.alignment!r}; expected None, 'mask' or 'gap'")
        if spec.alignment == "mask" and spec.reducer != "prune":
            raise ValueError("alignment='mask' keeps pruned positions in the scan and needs reducer='prune'")
    if spec.reducer == "evit" and not bb.has_cls:
        raise ValueError(f"EViT fusion needs a CLS token; {type(bb).__name__} has none")
    proposal_net = build_proposal(proposal, proposal_checkpoint) if ev_name == "papr" else None
    metric = reducer_options.pop("metric", spec.metric.get(family))
    options = dict(reducer_options)
    if metric:
        options["metric"] = metric
    if spec.reducer == "evit" and bb.is_ssm:
        options.setdefault("keep_order", True)
    # ToP's even count centres ViM's middle CLS; without a CLS (PlainMamba) there is nothing to centre
    count_rule = "round" if spec.count_rule == "even" and not bb.has_cls else spec.count_rule
    stages = []
    for layer in resolve_schedule(layers if layers is not None else spec.schedule, bb.num_layers,
                                  bb.reduction_point):
        ev = build_evaluator(ev_name, proposal=proposal_net, seed=seed, proposal_size=proposal_size) \
            if ev_name else None
        if ev is not None and layer == BEFORE_ENCODER and ev.needs - {"images"}:
            raise ValueError(f"evaluator {ev_name!r} needs {sorted(ev.needs)} from a block; it cannot run "
                             "before the encoder")
        stage = ReductionStage(layer, keep, ev, spec.reducer, smoothing=spec.smoothing, border=border,
                               smoothing_kind=smoothing_kind, alignment=spec.alignment, is_ssm=bb.is_ssm,
                               count_rule=count_rule, reducer_options=options)
        bb.check_signals(stage.needs - {"images"}, f"method {method!r} at layer {layer}")
        stages.append(stage)
    if any(s.layer == BEFORE_ENCODER for s in stages) and spec.reducer not in ("prune",):
        raise ValueError(f"reducer {spec.reducer!r} needs block signals and cannot run before the encoder")
    model = PrunedModel(bb, stages, method=method)
    model.evaluator_name = ev_name  # the evaluator every stage runs (None: the reducer needs no scores)
    model.evaluator_substitution = substitution  # {"requested", "used", "reason"} or None
    return model
