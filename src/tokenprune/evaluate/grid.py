"""Training-free evaluation grid: backbones × methods × token budgets on one data set, written as a report.

    python eval.py --config configs/eval/vim_small_imagenet.yaml
    python eval.py --config configs/eval/vim_small_imagenet.yaml --max_samples 5000 --throughput.batch_size 128
    python eval.py --backbones '[vim_test_patch4_32]' --methods '[random, papr_ss]' --data.val_shards /data/val

For each backbone the runner
1. builds the backbone once; every variant (unpruned + method × budget) wraps the *same* module, so all
   variants cost the memory of one model (plus one shared proposal ConvNet);
2. solves the per-stage keep ratio of each budget (`budget: reduction` -> `solve_keep`, `budget: flops` ->
   `solve_keep_for_flops`, `budget: keep` -> the values are keep ratios), counts params and FLOPs (fvcore,
   batch 1, proposal network included) on CPU;
3. makes ONE pass over the validation data: every batch is decoded once and run through every variant
   (each variant sees each sample exactly once), accumulating top-1/top-5 (torchmetrics), the measured token
   counts (from the stages' traces), the peak memory (CUDA) and the kept patches of the first images;
4. measures images/s of all its variants in ONE `compare_throughput` run (interleaved, same process, same
   synthetic batch), so every speed-up of a backbone's table is a ratio taken in the same run;
5. writes (and rewrites after every backbone) results.md / .csv / .json and the two plots.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import inspect
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

__all__ = ["BackboneEntry", "MethodEntry", "DataConfig", "ThroughputConfig", "VisualizeConfig", "EvalConfig",
           "build_parser", "parse_config", "run_grid", "main", "method_label", "build_datamodule",
           "build_backbone", "machine_info"]

BUDGET_MODES = ("reduction", "keep", "flops")

DISPLAY_NAMES = {
    "random": "Random", "l2": "L2-norm (naive)", "evit": "EViT", "tome": "ToMe", "pumer": "PuMer", "utr": "UTR",
    "top": "ToP", "hsa": "ToP+HSA", "papr": "PaPr", "papr_ss": "PaPr+SS", "visionzip": "VisionZip",
}
MERGING_REDUCERS = ("tome", "evit", "visionzip", "pumer", "utr")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class BackboneEntry:
    """One backbone of the grid.

    Args:
        model: timm name (tokenprune registers vim_*, plainmamba_*; every timm ViT/DeiT works)
        checkpoint_file: local official-layout weights file (never downloaded)
        name: display name in the report (default: the timm name)
        model_kwargs: extra timm.create_model keywords
        data: per-backbone data overrides (image_size, resize_size, mean, std)
    """
    model: str
    checkpoint_file: Optional[str] = None
    name: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodEntry:
    """One method row group: a preset name plus create_model options (smoothing, layers, alignment, ...).

    Args:
        method: preset name (tokenprune.list_methods())
        name: display label (default from the preset and its options, e.g. "PaPr+SS (k=5)")
        options: keyword arguments of tokenprune.create_model
    """
    method: str
    name: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Validation data: a data YAML (ShardDataModule arguments) and/or explicit values (these win).

    Args:
        config: YAML with ShardDataModule arguments (top level, under `data:`, or `init_args:`)
        val_shards: shard spec: brace pattern, glob, directory, or '::'-joined
        val_samples: samples in the split (default: _info.json)
        image_size: crop size (must match the backbone's input)
        resize_size: resize before the center crop (default: 256/224 x image_size for ImageNet sizes)
        mean: normalisation mean (default ImageNet)
        std: normalisation std (default ImageNet)
        num_classes: default: the backbone's number of classes
        num_workers: default: min(4, CPU cores)
    """
    config: Optional[str] = None
    val_shards: Optional[str] = None
    val_samples: Optional[int] = None
    image_size: Optional[int] = None
    resize_size: Optional[int] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    num_classes: Optional[int] = None
    num_workers: Optional[int] = None


@dataclass
class ThroughputConfig:
    """Speed measurement: synthetic input, eval mode, inference_mode, all variants of a backbone interleaved.

    Args:
        enabled: measure images/s and speed-ups
        batch_size: synthetic batch size
        warmup: untimed forwards per model (convention: >= 10)
        iters: timed forwards per model (convention: >= 30)
        device: default: --device
        dtype: float32 | float16 | bfloat16 (autocast)
    """
    enabled: bool = True
    batch_size: int = 64
    warmup: int = 10
    iters: int = 30
    device: Optional[str] = None
    dtype: str = "float32"


@dataclass
class VisualizeConfig:
    """kept_patches.png: the final kept patches of the first images, one column per method.

    Args:
        enabled: write kept_patches.png
        num_images: first validation images drawn
        reduction: draw the budget whose token reduction is closest to this
    """
    enabled: bool = True
    num_images: int = 4
    reduction: float = 0.4


@dataclass
class EvalConfig:
    """A training-free evaluation grid (see tokenprune.evaluate.grid).

    Args:
        backbones: timm names or {model, checkpoint_file, name, model_kwargs, data} entries
        methods: preset names or {method, name, options} entries, e.g. {method: papr_ss, options: {smoothing: 5}}
        reductions: budgets: token reductions (budget=reduction), FLOPs reductions (flops) or keep ratios (keep)
        budget: reduction (token reduction, solved) | keep (raw keep ratios) | flops (FLOPs reduction)
        proposal: PaPr proposal ConvNet (timm name)
        proposal_checkpoint: its local weights file
        max_samples: evaluate only the first N validation samples
        batch_size: validation batch size
        dtype: validation dtype (autocast on CUDA when not float32)
        flops: count params / FLOPs (fvcore, CPU)
        skip_inapplicable: skip (and list in the report) methods not defined for a backbone family
        name: report name; default output_dir = reports/<name or timestamp>
        device: auto | cpu | cuda | cuda:N
        seed: seed for random weights (no checkpoint_file) and the random evaluator
        progress: tqdm progress bars
    """
    backbones: List[Union[str, BackboneEntry]] = field(default_factory=list)
    methods: List[Union[str, MethodEntry]] = field(default_factory=list)
    reductions: List[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5])
    budget: str = "reduction"
    proposal: Optional[str] = None
    proposal_checkpoint: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    max_samples: Optional[int] = None
    batch_size: int = 64
    dtype: str = "float32"
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)
    flops: bool = True
    skip_inapplicable: bool = True
    name: Optional[str] = None
    output_dir: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True


# ---------------------------------------------------------------------------------------------- CLI
def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="eval.py", description=(
        "Training-free evaluation of token pruning/merging methods across token budgets; writes results.md/"
        ".csv/.json, accuracy_vs_gflops.png and kept_patches.png. Every field of a --config YAML can be "
        "overridden on the command line (nested: --throughput.iters 50, --data.val_shards DIR)."),
        default_env=False, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML grid file (configs/eval/*.yaml)")
    parser.add_class_arguments(EvalConfig, as_group=False, fail_untyped=True)
    return parser


def _to_dataclass(cls, value):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    if hasattr(value, "__dict__"):  # jsonargparse Namespace
        return cls(**{k: v for k, v in vars(value).items() if not k.startswith("__")})
    return value


def normalise_config(cfg: EvalConfig) -> EvalConfig:
    """Plain strings -> entries, dicts -> dataclasses; checks that need no model."""
    bbs = [BackboneEntry(model=b) if isinstance(b, str) else _to_dataclass(BackboneEntry, b) for b in cfg.backbones]
    methods = [MethodEntry(method=m) if isinstance(m, str) else _to_dataclass(MethodEntry, m) for m in cfg.methods]
    cfg = dataclasses.replace(cfg, backbones=bbs, methods=methods,
                              data=_to_dataclass(DataConfig, cfg.data) or DataConfig(),
                              throughput=_to_dataclass(ThroughputConfig, cfg.throughput) or ThroughputConfig(),
                              visualize=_to_dataclass(VisualizeConfig, cfg.visualize) or VisualizeConfig())
    if not cfg.backbones:
        raise ValueError("no backbone given: --backbones '[vim_small_patch16_224]' or a `backbones:` list")
    if cfg.budget not in BUDGET_MODES:
        raise ValueError(f"budget must be one of {BUDGET_MODES}, got {cfg.budget!r}")
    for r in cfg.reductions:
        if cfg.budget == "keep" and not 0.0 < r <= 1.0:
            raise ValueError(f"budget=keep: values of `reductions` are keep ratios in (0, 1], got {r!r}")
        if cfg.budget != "keep" and not 0.0 <= r < 1.0:
            raise ValueError(f"budget={cfg.budget}: reductions must be in [0, 1), got {r!r}")
    for b in cfg.backbones:
        for key in b.data:
            if key not in ("image_size", "resize_size", "mean", "std"):
                raise ValueError(f"backbone {b.model}: unknown data override {key!r}; expected image_size, "
                                 "resize_size, mean or std")
    if cfg.batch_size <= 0 or (cfg.max_samples is not None and cfg.max_samples <= 0):
        raise ValueError(f"batch_size and max_samples must be > 0, got {cfg.batch_size} / {cfg.max_samples}")
    for dt in (cfg.dtype, cfg.throughput.dtype):
        _dtype(dt)
    return cfg


def parse_config(argv: Optional[List[str]] = None):
    """(EvalConfig, resolved config as YAML text) from the command line."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    dumped = parser.dump(ns, skip_unset=False)
    ns_dict = {k: v for k, v in vars(ns).items() if k != "config" and not k.startswith("__")}
    init = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    values = {f.name: getattr(init, f.name) for f in dataclasses.fields(EvalConfig) if f.name in ns_dict}
    return normalise_config(EvalConfig(**values)), dumped


# ---------------------------------------------------------------------------------------------- helpers
def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected float32, float16 or bfloat16")
    return table[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available on this machine")
    return dev


def method_label(entry: MethodEntry) -> str:
    """Display label: the entry's name, else the preset's display name plus its options."""
    if entry.name:
        return entry.name
    base = DISPLAY_NAMES.get(entry.method, entry.method)
    opts = dict(entry.options)
    if entry.method == "papr_ss":
        opts.setdefault("smoothing", 3)
    parts = []
    for k, v in opts.items():
        if k == "smoothing":
            parts.append(f"k={v}")
        else:
            parts.append(f"{k}={v}")
    return f"{base} ({', '.join(parts)})" if parts else base


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def machine_info(device: torch.device) -> Dict[str, Any]:
    import timm

    import tokenprune

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "tokenprune": tokenprune.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda": torch.version.cuda if device.type == "cuda" else None}
    return info


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


def build_datamodule(data: DataConfig, batch_size: int, num_classes: int, overrides: Optional[dict] = None):
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
    if "resize_size" not in args and "image_size" in args:
        args["resize_size"] = max(args["image_size"], round(args["image_size"] * 256 / 224)) \
            if args["image_size"] >= 224 else args["image_size"]
    if "mean" in args:
        args["mean"] = tuple(args["mean"])
    if "std" in args:
        args["std"] = tuple(args["std"])
    dm = ShardDataModule(**args)
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


def _throughput(models: Dict[str, nn.Module], cfg: ThroughputConfig, device: torch.device, input_size,
                progress: bool) -> Dict[str, Any]:
    """images/s, speed-up vs the first model (the unpruned one) and peak memory, all models in ONE
    interleaved `compare_throughput` run (tokenprune.bench.throughput)."""
    from ..bench.throughput import compare_throughput

    return compare_throughput(models, input_size=tuple(input_size), batch_size=cfg.batch_size, warmup=cfg.warmup,
                              iters=cfg.iters, device=device, dtype=cfg.dtype, reference=next(iter(models)),
                              verbose=progress)


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool, type(None))) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v))


def _input_size(bb: nn.Module):
    from ..flops import default_input_size

    return default_input_size(bb)


def _flops_fields(model: nn.Module) -> Dict[str, Any]:
    from ..flops import count_flops

    rep = count_flops(model)
    proposal = sum(v for k, v in rep.by_module.items() if re.fullmatch(r"stages\.\d+\.evaluator\.proposal", k))
    return {"gflops": rep.total / 1e9, "gflops_paper": rep.paper / 1e9 if rep.paper is not None else None,
            "gflops_proposal": proposal / 1e9}


def _applicable(bb: nn.Module, method: str) -> bool:
    from ..pruning.methods import inapplicable_reason

    return inapplicable_reason(method, bb) is None


def _build_variants(bb: nn.Module, cfg: EvalConfig, proposal: Optional[nn.Module], progress: bool):
    from ..pruning.methods import create_model, inapplicable_reason
    from .budget import solve_keep, solve_keep_for_flops

    variants = [Variant("unpruned", "Unpruned", None, None, None, None, 1.0, create_model(bb).eval())]
    skipped = []
    labels = {}
    work = [(e, r) for e in cfg.methods for r in cfg.reductions]
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
        model = create_model(bb, entry.method, keep=keep, seed=cfg.seed, **opts).eval()
        variants.append(Variant(f"{label}@{budget}", label, entry.method, entry, cfg.budget, float(budget), keep,
                                model))
    return variants, skipped


def _top_k(num_classes: int, k: int, device):
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro").to(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        import contextlib
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _vis_variants(variants: List[Variant], target: float) -> Dict[str, Variant]:
    """Per method label, the pruned variant whose simulated token reduction is closest to target."""
    best: Dict[str, Variant] = {}
    for v in variants:
        if v.method is None:
            continue
        r = v.model.token_reduction()
        if v.label not in best or abs(r - target) < abs(best[v.label].model.token_reduction() - target):
            best[v.label] = v
    return best


def _validate(variants: List[Variant], dm, cfg: EvalConfig, device: torch.device, num_classes: int,
              backbone_name: str, progress: bool) -> Dict[str, Any]:
    """One pass over the validation data, every batch through every variant."""
    from .budget import measured_token_reduction, tokens_per_block_from_trace

    dtype = _dtype(cfg.dtype)
    for v in variants:
        v.metrics = (_top_k(num_classes, 1, device), _top_k(num_classes, 5, device))
        v.peak_mem = 0
    vis = _vis_variants(variants, cfg.visualize.reduction) if cfg.visualize.enabled else {}
    vis_keys = {v.key for v in vis.values()}
    need = cfg.visualize.num_images if cfg.visualize.enabled else 0
    vis_images: List[torch.Tensor] = []
    vis_kept: Dict[str, List[torch.Tensor]] = {v.label: [] for v in vis.values()}
    vis_labels: List[torch.Tensor] = []
    total = dm.val_set.num_samples if dm.val_set is not None else None
    if cfg.max_samples is not None:
        total = cfg.max_samples if total is None else min(total, cfg.max_samples)
    seen = 0
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"validating {backbone_name} ({len(variants)} variants)", unit="img",
               disable=not progress, leave=False)
    loader = dm.val_dataloader()
    try:
        for images, labels in loader:
            if cfg.max_samples is not None and seen + len(labels) > cfg.max_samples:
                n = cfg.max_samples - seen
                images, labels = images[:n], labels[:n]
            if len(labels) == 0:
                break
            take = min(need - sum(len(x) for x in vis_images), len(labels)) if need else 0
            if take > 0:
                vis_images.append((images[:take] * std + mean).clamp(0, 1).cpu())
                vis_labels.append(labels[:take].cpu())
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            for v in variants:
                record = take > 0 and v.key in vis_keys
                if record:
                    v.model.record_kept_patches(True)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with torch.inference_mode(), _autocast(device, dtype):
                    logits = v.model(images)
                if device.type == "cuda":
                    v.peak_mem = max(v.peak_mem, torch.cuda.max_memory_allocated(device))
                logits = logits.float()
                v.metrics[0].update(logits, labels)
                v.metrics[1].update(logits, labels)
                if "token_reduction" not in v.row and v.method is not None:
                    v.row["token_reduction"] = measured_token_reduction(v.model)
                    v.row["tokens_per_block"] = tokens_per_block_from_trace(v.model)
                if record:
                    final = v.model.kept_patches[-1][1] if v.model.kept_patches else None
                    v.model.record_kept_patches(False)
                    if final is None:
                        raise RuntimeError(f"{v.label}: no kept patches were recorded")
                    vis_kept[v.label].append(final[:take].cpu())
            seen += len(labels)
            bar.update(len(labels))
            if cfg.max_samples is not None and seen >= cfg.max_samples:
                break
    finally:
        bar.close()
        del loader
    if seen == 0:
        raise RuntimeError(f"{backbone_name}: the validation loader gave no sample")
    visual = None
    if vis_images:
        visual = {"images": torch.cat(vis_images), "labels": torch.cat(vis_labels), "target": cfg.visualize.reduction,
                  "methods": {label: {"patch_index": torch.cat(vis_kept[label]), "keep": v.keep,
                                      "budget": v.budget, "token_reduction": v.model.token_reduction(),
                                      "merging": any(s.reducer_name in MERGING_REDUCERS for s in v.model.stages)}
                              for label, v in vis.items()}}
    return {"samples": seen, "seconds": time.perf_counter() - t0, "visual": visual}


def evaluate_backbone(entry: BackboneEntry, cfg: EvalConfig, device: torch.device, progress: bool = True):
    """Rows (one per variant) and the visual of one backbone."""
    from ..models.proposal import build_proposal
    from ..pruning.methods import METHODS

    name = entry.name or entry.model
    torch.manual_seed(cfg.seed)
    bb = build_backbone(entry)
    family = "ssm" if bb.is_ssm else "vit"
    needs_proposal = any(_applicable(bb, m.method) and m.method in METHODS and "papr" == m.options.get(
        "evaluator", (METHODS[m.method].evaluator or {}).get(family)) for m in cfg.methods)
    proposal = build_proposal(cfg.proposal, cfg.proposal_checkpoint) if (needs_proposal and cfg.proposal) else None
    variants, skipped = _build_variants(bb, cfg, proposal, progress)
    input_size = _input_size(bb)
    for v in tqdm(variants, desc=f"params/FLOPs {name}", disable=not progress, leave=False):
        v.row.update(params=_unique_params(v.model), params_backbone=_unique_params(bb),
                     token_reduction_simulated=v.model.token_reduction())
        if cfg.flops:
            v.row.update(_flops_fields(v.model))
    for v in variants:
        v.model.to(device)
    dm = build_datamodule(cfg.data, cfg.batch_size, bb.num_classes, entry.data)
    if tuple(input_size[1:]) != (dm.image_size, dm.image_size):
        raise ValueError(f"{name} takes {input_size[1]}x{input_size[2]} images but the data gives "
                         f"{dm.image_size}x{dm.image_size}; set data.image_size (or the backbone's data: override)")
    val = _validate(variants, dm, cfg, device, dm.num_classes, name, progress)
    tput: Dict[str, Any] = {"models": {}, "speedup": {}, "speedup_rounds": {}}
    if cfg.throughput.enabled:
        tdev = resolve_device(cfg.throughput.device) if cfg.throughput.device else device
        models = {v.key: v.model.to(tdev) for v in variants}
        if progress:
            print(f"[eval] {name}: measuring throughput of {len(models)} variants in one run on {tdev} "
                  f"(batch {cfg.throughput.batch_size}, {cfg.throughput.warmup}+{cfg.throughput.iters} iters)",
                  file=sys.stderr)
        tput = _throughput(models, cfg.throughput, tdev, input_size, progress)
    base = variants[0]
    base_top1 = float(base.metrics[0].compute()) * 100
    rows = []
    for v in variants:
        top1 = float(v.metrics[0].compute()) * 100
        top5 = float(v.metrics[1].compute()) * 100
        t = tput["models"].get(v.key, {})
        ips = t.get("images_per_s")
        if t.get("device", "").startswith("cuda"):
            peak = t.get("peak_mem_mb")  # timed throughput iterations (CUDA allocator peak)
        else:
            peak = (v.peak_mem / 2**20) if device.type == "cuda" else None
        row = {
            "backbone": name, "model": entry.model, "checkpoint_file": entry.checkpoint_file,
            "method": v.method or "none", "label": v.label, "options": dict(v.entry.options) if v.entry else {},
            "unpruned": v.method is None, "budget_mode": v.budget_mode, "budget": v.budget, "keep": v.keep,
            "token_reduction": v.row.get("token_reduction", 0.0 if v.method is None else None),
            "token_reduction_simulated": v.row.get("token_reduction_simulated"),
            "tokens_per_block": v.row.get("tokens_per_block") or base.model.tokens_per_block(),
            "params": v.row.get("params"), "params_backbone": v.row.get("params_backbone"),
            "gflops": v.row.get("gflops"), "gflops_paper": v.row.get("gflops_paper"),
            "gflops_proposal": v.row.get("gflops_proposal"),
            "top1": top1, "top5": top5, "delta_top1": top1 - base_top1, "samples": val["samples"],
            "images_per_s": ips, "speedup": tput["speedup"].get(v.key), "peak_mem_mib": peak,
            "peak_mem_validation_mib": (v.peak_mem / 2**20) if device.type == "cuda" else None,
            "throughput": {**{k: x for k, x in t.items() if k != "images_per_s" and _jsonable(x)},
                           "speedup_rounds": tput["speedup_rounds"].get(v.key)},
        }
        rows.append(row)
        v.metrics = None
    info = {"name": name, "model": entry.model, "checkpoint_file": entry.checkpoint_file,
            "random_weights": not entry.checkpoint_file, "family": "ssm" if bb.is_ssm else "vit",
            "depth": bb.num_layers, "grid": list(bb.grid), "seq_len": bb.seq_len, "input_size": list(input_size),
            "skipped": skipped, "samples": val["samples"], "validation_seconds": val["seconds"],
            "data": {"val_shards": dm.val_shards, "val_samples": dm.val_set.num_samples if dm.val_set else None,
                     "image_size": dm.image_size, "resize_size": dm.resize_size, "mean": list(dm.mean),
                     "std": list(dm.std), "num_classes": dm.num_classes},
            "skipped_samples": dm.skipped_counts("validation"),
            "throughput": {k: tput.get(k) for k in ("device", "device_name", "dtype", "batch", "threads", "rounds",
                                                    "iters", "warmup", "reference") if k in tput}}
    del variants, bb, proposal
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, info, val["visual"]


def run_grid(cfg: EvalConfig, config_text: Optional[str] = None, command: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate the grid and write the report; returns the result (meta, backbones, rows, visuals)."""
    from ..report import write_report

    cfg = normalise_config(cfg)
    device = resolve_device(cfg.device)
    stamp = _dt.datetime.now()
    out = cfg.output_dir or os.path.join("reports", cfg.name or stamp.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    if config_text is not None:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(config_text)
    meta = {"date": stamp.isoformat(timespec="seconds"), "name": cfg.name, "command": command,
            "machine": machine_info(device), "budget_mode": cfg.budget, "reductions": list(cfg.reductions),
            "max_samples": cfg.max_samples, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
            "proposal": cfg.proposal, "proposal_checkpoint": cfg.proposal_checkpoint,
            "throughput": dataclasses.asdict(cfg.throughput), "flops_convention": (
                "fvcore, 1 fused multiply-add = 1 FLOP, batch 1, every op run counted (both scan directions, "
                "attention matmuls, the PaPr proposal ConvNet); 'paper' = ViM-paper convention (one scan direction)"),
            "grouping": "all variants of a backbone: one validation pass, one compare_throughput run"}
    result: Dict[str, Any] = {"meta": meta, "backbones": [], "rows": [], "visuals": {}}
    for entry in tqdm(cfg.backbones, desc="grid", disable=not cfg.progress or len(cfg.backbones) == 1):
        rows, info, visual = evaluate_backbone(entry, cfg, device, progress=cfg.progress)
        result["rows"].extend(rows)
        result["backbones"].append(info)
        if visual is not None:
            result["visuals"][info["name"]] = visual
        result["files"] = write_report(result, out)  # rewritten after every backbone: partial results survive
    result["output_dir"] = out
    return result


DEFAULT_CONFIG = os.path.join("configs", "eval", "digits_micro.yaml")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args and os.path.isfile(DEFAULT_CONFIG):  # `python eval.py` alone runs the built-in default
        print(f"no arguments: running the built-in default grid {DEFAULT_CONFIG}")
        argv = ["--config", DEFAULT_CONFIG]
    cfg, text = parse_config(argv)
    command = " ".join(["python eval.py", *(sys.argv[1:] if argv is None else argv)])
    result = run_grid(cfg, config_text=text, command=command)
    out = result["output_dir"]
    print(f"\nreport written to {os.path.abspath(out)}/")
    for f in result.get("files", []):
        print(f"  {f}")
    return result
