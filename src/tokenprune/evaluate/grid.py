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
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

# The schema, builders and measurements live in sibling modules; every name is re-exported here
# (eval.py, the tests and the docs import them from tokenprune.evaluate.grid).
from .config import (BUDGET_MODES, BackboneEntry, DataConfig, EvalConfig, MethodEntry,  # noqa: F401
                     ThroughputConfig, VisualizeConfig, _to_dataclass, build_parser, normalise_config,
                     methods_for, parse_config, resolve_device)
from ..bench.throughput import as_dtype, machine_info
from .measure import _flops_fields, _input_size, _jsonable, _throughput, _unique_params
from ..models.timm_contract import model_data_config
from .labels import DISPLAY_NAMES, method_label  # noqa: F401
from .variants import (MERGING_REDUCERS, Variant, _applicable, _build_variants,  # noqa: F401
                       _read_data_yaml, build_backbone, build_datamodule)

__all__ = ["BackboneEntry", "MethodEntry", "DataConfig", "ThroughputConfig", "VisualizeConfig", "EvalConfig",
           "build_parser", "parse_config", "run_grid", "main", "method_label", "build_datamodule",
           "build_backbone", "machine_info"]


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
              backbone_name: str, progress: bool, draw: bool = True) -> Dict[str, Any]:
    """One pass over the validation data, every batch through every variant (``draw``: record the kept
    patches of the first images for kept_patches.png)."""
    from .budget import measured_token_reduction, tokens_per_block_from_trace

    dtype = as_dtype(cfg.dtype)
    for v in variants:
        v.metrics = (_top_k(num_classes, 1, device), _top_k(num_classes, 5, device))
        v.peak_mem = 0
    draw = draw and cfg.visualize.enabled
    vis = _vis_variants(variants, cfg.visualize.reduction) if draw else {}
    vis_keys = {v.key for v in vis.values()}
    need = cfg.visualize.num_images if draw else 0
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


def _is_timed(v: Variant, reductions: Optional[List[float]]) -> bool:
    """Whether throughput measures this variant: the unpruned one always, the others when their budget is
    one of ``throughput.reductions`` (None: all)."""
    return v.method is None or reductions is None or any(abs(v.budget - r) < 1e-9 for r in reductions)


def _needs_proposal(bb: torch.nn.Module, family: str, methods: List[MethodEntry]) -> bool:
    """Whether one of the applicable methods scores tokens with the PaPr proposal ConvNet."""
    from ..pruning.methods import METHODS

    return any(_applicable(bb, m.method) and m.method in METHODS and "papr" == m.options.get(
        "evaluator", (METHODS[m.method].evaluator or {}).get(family)) for m in methods)


def _count_params_and_flops(variants: List[Variant], bb: torch.nn.Module, cfg: EvalConfig, name: str,
                            progress: bool) -> None:
    """Parameters, simulated token reduction and (with ``cfg.flops``) FLOPs of every variant, into its row."""
    for v in tqdm(variants, desc=f"params/FLOPs {name}", disable=not progress, leave=False):
        v.row.update(params=_unique_params(v.model), params_backbone=_unique_params(bb),
                     token_reduction_simulated=v.model.token_reduction())
        if cfg.flops:
            v.row.update(_flops_fields(v.model))


def _validation_data(entry: BackboneEntry, cfg: EvalConfig, bb: torch.nn.Module, input_size, name: str):
    """The backbone's validation data module; its image size must be the one the backbone takes."""
    dm = build_datamodule(cfg.data, cfg.batch_size, bb.num_classes, entry.data, model_data_config(bb))
    if tuple(input_size[1:]) != (dm.image_size, dm.image_size):
        raise ValueError(f"{name} takes {input_size[1]}x{input_size[2]} images but the data gives "
                         f"{dm.image_size}x{dm.image_size}; set data.image_size (or the backbone's data: override)")
    return dm


def _time_variants(variants: List[Variant], cfg: EvalConfig, device: torch.device, input_size, name: str,
                   progress: bool) -> Dict[str, Any]:
    """Throughput of the timed variants in one interleaved run (empty results when nothing is timed)."""
    tput: Dict[str, Any] = {"models": {}, "speedup": {}, "speedup_rounds": {}}
    timed = [v for v in variants if _is_timed(v, cfg.throughput.reductions)]
    # with throughput.reductions set, a backbone left with its unpruned model alone is not timed: a reference
    # with no variant to give a speed-up (unset, the unpruned model alone still gets its images/s)
    if cfg.throughput.enabled and (len(timed) > 1 or cfg.throughput.reductions is None):
        tdev = resolve_device(cfg.throughput.device) if cfg.throughput.device else device
        models = {v.key: v.model.to(tdev) for v in timed}
        if progress:
            print(f"[eval] {name}: measuring throughput of {len(models)} variants in one run on {tdev} "
                  f"(batch {cfg.throughput.batch_size}, {cfg.throughput.warmup}+{cfg.throughput.iters} iters)",
                  file=sys.stderr)
        tput = _throughput(models, cfg.throughput, tdev, input_size, progress)
    return tput


def _variant_row(entry: BackboneEntry, name: str, v: Variant, base: Variant, base_top1: float,
                 val: Dict[str, Any], tput: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The report row of one variant: accuracy, token reduction, parameters, FLOPs, speed and memory."""
    top1 = float(v.metrics[0].compute()) * 100
    top5 = float(v.metrics[1].compute()) * 100
    t = tput["models"].get(v.key, {})
    ips = t.get("images_per_s")
    if t.get("device", "").startswith("cuda"):
        peak = t.get("peak_mem_mb")  # timed throughput iterations (CUDA allocator peak)
    else:
        peak = (v.peak_mem / 2**20) if device.type == "cuda" else None
    return {
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
        "host_over_gpu": t.get("host_over_gpu"),  # GPU throughput runs only (tokenprune.bench.host_time)
        "peak_mem_validation_mib": (v.peak_mem / 2**20) if device.type == "cuda" else None,
        "throughput": {**{k: x for k, x in t.items() if k != "images_per_s" and _jsonable(x)},
                       "speedup_rounds": tput["speedup_rounds"].get(v.key)},
    }


def _backbone_info(entry: BackboneEntry, name: str, family: str, bb: torch.nn.Module, input_size,
                   skipped: list, val: Dict[str, Any], dm, tput: Dict[str, Any]) -> Dict[str, Any]:
    """The report's description of one backbone: architecture, data, skipped methods/samples, timing setup."""
    return {"name": name, "model": entry.model, "checkpoint_file": entry.checkpoint_file,
            "random_weights": not entry.checkpoint_file, "family": family,
            "depth": bb.num_layers, "grid": list(bb.grid), "seq_len": bb.seq_len, "input_size": list(input_size),
            "skipped": skipped, "samples": val["samples"], "validation_seconds": val["seconds"],
            "data": {"val_shards": dm.val_shards, "val_samples": dm.val_set.num_samples if dm.val_set else None,
                     "image_size": dm.image_size, "resize_size": dm.resize_size, "mean": list(dm.mean),
                     "std": list(dm.std), "num_classes": dm.num_classes},
            "skipped_samples": dm.skipped_counts("validation"),
            "throughput": {k: tput.get(k) for k in ("device", "device_name", "dtype", "batch", "threads", "rounds",
                                                    "iters", "warmup", "reference") if k in tput}}


def evaluate_backbone(entry: BackboneEntry, cfg: EvalConfig, device: torch.device, progress: bool = True):
    """Rows (one per variant) and the visual of one backbone."""
    from ..models.proposal import build_proposal
    from ..pruning.methods import family_of

    name = entry.name or entry.model
    torch.manual_seed(cfg.seed)
    bb = build_backbone(entry)
    family = family_of(bb)
    methods = methods_for(entry, cfg)
    needs_proposal = _needs_proposal(bb, family, methods)
    proposal = build_proposal(cfg.proposal, cfg.proposal_checkpoint) if (needs_proposal and cfg.proposal) else None
    variants, skipped = _build_variants(bb, cfg, proposal, progress, methods, entry.reductions)
    input_size = _input_size(bb)
    _count_params_and_flops(variants, bb, cfg, name, progress)
    for v in variants:
        v.model.to(device)
    dm = _validation_data(entry, cfg, bb, input_size, name)
    val = _validate(variants, dm, cfg, device, dm.num_classes, name, progress, draw=entry.visualize)
    tput = _time_variants(variants, cfg, device, input_size, name, progress)
    base = variants[0]
    base_top1 = float(base.metrics[0].compute()) * 100
    rows = []
    for v in variants:
        rows.append(_variant_row(entry, name, v, base, base_top1, val, tput, device))
        v.metrics = None
    info = _backbone_info(entry, name, family, bb, input_size, skipped, val, dm, tput)
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
        # rewritten after every backbone, so partial results survive an interruption
        result["files"] = write_report(result, out, redraw_kept_patches=visual is not None)
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
