"""Configuration of the evaluation grid (``eval.py``): the schema (dataclasses), the jsonargparse parser,
normalisation/validation of a config, and the device names it uses (dtype names: tokenprune.bench.throughput).

Re-exported by tokenprune.evaluate.grid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch

from ..bench.throughput import as_dtype
from .labels import method_label

__all__ = ["BackboneEntry", "MethodEntry", "DataConfig", "ThroughputConfig", "VisualizeConfig", "EvalConfig",
           "build_parser", "parse_config", "methods_for", "normalise_config", "resolve_device", "BUDGET_MODES"]

BUDGET_MODES = ("reduction", "keep", "flops")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class BackboneEntry:
    """One backbone of the grid.

    Args:
        model: timm name (tokenprune registers vim_*, plainmamba_*; every timm ViT/DeiT works)
        checkpoint_file: local official-layout weights file (never downloaded)
        name: display name in the report (default: the timm name)
        model_kwargs: extra timm.create_model keywords
        data: per-backbone data overrides (image_size, resize_size, mean, std, interpolation, crop_pct)
        methods: the grid's methods this backbone runs, by label or preset name (default: all), so that each
            table has the rows of its paper (e.g. ToMe/VisionZip for DeiT, PuMer/UTR/ToP for ViM)
        reductions: this backbone's budgets (default: the grid's), e.g. only the budget a fine-tuned model
            was trained for
        visualize: draw this backbone's rows in kept_patches.png (e.g. off for single-method fine-tuned rows)
    """
    model: str
    checkpoint_file: Optional[str] = None
    name: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)
    methods: Optional[List[str]] = None
    reductions: Optional[List[float]] = None
    visualize: bool = True


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


DATA_OVERRIDES = ("image_size", "resize_size", "mean", "std", "interpolation", "crop_pct")


@dataclass
class DataConfig:
    """Validation data: a data YAML (ShardDataModule arguments) and/or explicit values (these win).

    Args:
        config: YAML with ShardDataModule arguments (top level, under `data:`, or `init_args:`)
        val_shards: shard spec: brace pattern, glob, directory, or '::'-joined
        val_samples: samples in the split (default: _info.json)
        image_size: crop size (default: the backbone's input size, from its timm data config)
        resize_size: resize before the center crop (default: floor(image_size / crop_pct))
        mean: normalisation mean (default: the backbone's data config)
        std: normalisation std (default: the backbone's data config)
        interpolation: resize interpolation (default: the backbone's data config)
        crop_pct: center-crop fraction (default: the backbone's data config)
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
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None
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
        reductions: time only the variants of these budgets (values as in the grid's `reductions`; default:
            every budget); the unpruned model is always timed, as the reference of the speed-ups. Timing is
            most of a CPU grid's run time: the built-in default times the 40 % column only
    """
    enabled: bool = True
    batch_size: int = 64
    warmup: int = 10
    iters: int = 30
    device: Optional[str] = None
    dtype: str = "float32"
    reductions: Optional[List[float]] = None


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
        compile: none (eager) | compile (torch.compile) | cudagraph (CUDA-graph replay at a fixed batch), for
            every variant (accuracy and throughput; the throughput records say which ran)
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
    compile: str = "none"
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
    from ..pruning.capture import check_mode
    check_mode(cfg.compile)  # a typo fails before any model is built
    if cfg.budget not in BUDGET_MODES:
        raise ValueError(f"budget must be one of {BUDGET_MODES}, got {cfg.budget!r}")
    for r in [r for b in cfg.backbones for r in (b.reductions or [])] + list(cfg.reductions):
        if cfg.budget == "keep" and not 0.0 < r <= 1.0:
            raise ValueError(f"budget=keep: values of `reductions` are keep ratios in (0, 1], got {r!r}")
        if cfg.budget != "keep" and not 0.0 <= r < 1.0:
            raise ValueError(f"budget={cfg.budget}: reductions must be in [0, 1), got {r!r}")
    for b in cfg.backbones:
        methods_for(b, cfg)  # raises on unknown names
        for key in b.data:
            if key not in DATA_OVERRIDES:
                raise ValueError(f"backbone {b.model}: unknown data override {key!r}; expected one of "
                                 f"{', '.join(DATA_OVERRIDES)}")
    timed = cfg.throughput.reductions
    if timed is not None:
        if not timed:
            raise ValueError("throughput.reductions is empty: list the budgets to time, or leave it unset "
                             "(null) to time every variant")
        budgets = set(cfg.reductions) | {r for b in cfg.backbones for r in (b.reductions or [])}
        unknown = [r for r in timed if not any(abs(r - b) < 1e-9 for b in budgets)]
        if unknown:
            raise ValueError(f"throughput.reductions {unknown} are not budgets of the grid (its budgets: "
                             f"{sorted(budgets)})")
    if cfg.batch_size <= 0 or (cfg.max_samples is not None and cfg.max_samples <= 0):
        raise ValueError(f"batch_size and max_samples must be > 0, got {cfg.batch_size} / {cfg.max_samples}")
    for dt in (cfg.dtype, cfg.throughput.dtype):
        as_dtype(dt)  # unknown names raise, naming the value and the choices
    return cfg


def methods_for(entry: BackboneEntry, cfg: EvalConfig) -> List[MethodEntry]:
    """The method entries of ``cfg`` that ``entry`` runs (its ``methods`` list, by label or preset name)."""
    if entry.methods is None:
        return list(cfg.methods)
    names = set(entry.methods)
    chosen = [m for m in cfg.methods if method_label(m) in names or m.method in names]
    known = {method_label(m) for m in cfg.methods} | {m.method for m in cfg.methods}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"backbone {entry.name or entry.model}: methods {unknown} are not in the grid's "
                         f"`methods` (labels and presets there: {sorted(known)})")
    return chosen


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
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available on this machine")
    return dev
