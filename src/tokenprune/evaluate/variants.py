"""Building what one backbone of the evaluation grid runs: the backbone (timm + local checkpoint), its
validation data module, and the variants (unpruned + method x budget, budgets solved per method).

Re-exported by tokenprune.evaluate.grid.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import yaml
from torch import nn
from tqdm.auto import tqdm

from .config import BackboneEntry, DataConfig, EvalConfig, MethodEntry
from .labels import DISPLAY_NAMES, method_label, scorer_label  # noqa: F401  (re-exported)

__all__ = ["build_backbone", "build_datamodule", "method_label", "Variant", "DISPLAY_NAMES", "MERGING_REDUCERS"]

MERGING_REDUCERS = ("tome", "evit", "visionzip", "pumer", "utr")


def build_backbone(entry: BackboneEntry) -> nn.Module:
    """timm model (+ local checkpoint) -> TokenBackbone in eval mode."""
    import timm
    from timm.models import model_entrypoint

    from ..models.checkpoint import load_checkpoint_file
    from ..pruning.methods import as_backbone

    if entry.model not in timm.list_models():
        as_backbone(entry.model)  # raises the clear "unknown backbone" error
    kwargs = dict(entry.model_kwargs)
    ours = model_entrypoint(entry.model).__module__.startswith("tokenprune")
    if entry.checkpoint_file and ours:
        kwargs["checkpoint_file"] = entry.checkpoint_file
    model = timm.create_model(entry.model, **kwargs)
    if entry.checkpoint_file and not ours:  # a timm model: official file through timm's key filter
        module = sys.modules[type(model).__module__]
        load_checkpoint_file(model, entry.checkpoint_file, getattr(module, "checkpoint_filter_fn", None))
    return as_backbone(model).eval()


def _read_data_yaml(path: str) -> Dict[str, Any]:
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"data config {path}: expected a mapping, got {type(doc).__name__}")
    if "data" in doc and isinstance(doc["data"], dict):
        doc = doc["data"]
    if "init_args" in doc:
        doc = doc["init_args"] or {}
    doc = {k: v for k, v in doc.items() if k != "class_path"}
    return doc


def build_datamodule(data: DataConfig, batch_size: int, num_classes: int, overrides: Optional[dict] = None,
                     model_data_config: Optional[dict] = None):
    """ShardDataModule for evaluation (no mixup) from the data YAML, explicit fields and per-backbone overrides."""
    from ..data import ShardDataModule

    allowed = set(inspect.signature(ShardDataModule.__init__).parameters) - {"self"}
    args: Dict[str, Any] = _read_data_yaml(data.config) if data.config else {}
    unknown = set(args) - allowed
    if unknown:
        raise ValueError(f"data config {data.config}: unknown ShardDataModule argument(s) {sorted(unknown)}; "
                         f"expected some of {sorted(allowed)}")
    for f in dataclasses.fields(DataConfig):
        value = getattr(data, f.name)
        if f.name != "config" and value is not None:
            args[f.name] = value
    args.update(overrides or {})
    if not args.get("val_shards"):
        raise ValueError("no validation data: set data.val_shards (a shard spec) or data.config (a data YAML)")
    args.setdefault("num_classes", num_classes)
    args.setdefault("num_workers", min(4, os.cpu_count() or 1))
    args.pop("train_shards", None)
    args.update(val_batch_size=batch_size, mixup=0.0, cutmix=0.0)
    if "mean" in args:
        args["mean"] = tuple(args["mean"])
    if "std" in args:
        args["std"] = tuple(args["std"])
    dm = ShardDataModule(**args)
    dm.use_model_data_config(model_data_config)  # sizes / crop / mean / std the model says, unless set above
    dm.set_distributed(0, 1)  # one process evaluates every sample (RANK/WORLD_SIZE of a launcher are ignored)
    dm.setup("validate")
    return dm

# ---------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    key: str  # unique within a backbone
    label: str
    method: Optional[str]
    entry: Optional[MethodEntry]
    budget_mode: Optional[str]
    budget: Optional[float]  # target (reduction / flops reduction) or keep ratio, as given
    keep: float
    model: nn.Module
    row: Dict[str, Any] = field(default_factory=dict)
    metrics: Any = None
    peak_mem: int = 0

def _applicable(bb: nn.Module, method: str) -> bool:
    from ..pruning.methods import inapplicable_reason

    return inapplicable_reason(method, bb) is None


def _build_variants(bb: nn.Module, cfg: EvalConfig, proposal: Optional[nn.Module], progress: bool,
                    methods: Optional[list] = None, reductions: Optional[list] = None):
    from ..pruning.methods import create_model, inapplicable_reason
    from .budget import solve_keep, solve_keep_for_flops

    variants = [Variant("unpruned", "Unpruned", None, None, None, None, 1.0,
                        create_model(bb, compile=cfg.compile).eval())]
    skipped = []
    labels = {}
    work = [(e, r) for e in (cfg.methods if methods is None else methods)
            for r in (cfg.reductions if reductions is None else reductions)]
    unpruned_flops = None
    for entry, budget in tqdm(work, desc="building variants", disable=not progress, leave=False):
        label = method_label(entry)
        if not _applicable(bb, entry.method):
            if not cfg.skip_inapplicable:
                create_model(bb, entry.method, keep=0.5, proposal=proposal, **entry.options)  # raises
            if label not in [s["label"] for s in skipped]:
                skipped.append({"label": label, "method": entry.method,
                                "reason": inapplicable_reason(entry.method, bb)})
            continue
        if labels.get(label, entry) is not entry:
            raise ValueError(f"two method entries have the same label {label!r}; give one a `name:`")
        labels[label] = entry
        opts = dict(entry.options)
        if "keep" in opts:
            raise ValueError(f"method {label}: set budgets with `reductions`/`budget`, not options.keep")
        if proposal is not None:
            opts.setdefault("proposal", proposal)
        if cfg.budget == "keep":
            keep = float(budget)
        elif cfg.budget == "reduction":
            keep = solve_keep(bb, entry.method, float(budget), **opts)
        else:
            if unpruned_flops is None:
                from ..flops import count_flops
                unpruned_flops = count_flops(variants[0].model).total
            keep = solve_keep_for_flops(bb, entry.method, 1.0 - float(budget), unpruned_flops=unpruned_flops,
                                        **opts)
        model = create_model(bb, entry.method, keep=keep, seed=cfg.seed, compile=cfg.compile, **opts).eval()
        shown = scorer_label(label, model)  # "PuMer (L2 scorer)" where the preset's CLS scorer was replaced
        variants.append(Variant(f"{shown}@{budget}", shown, entry.method, entry, cfg.budget, float(budget), keep,
                                model))
    return variants, skipped
