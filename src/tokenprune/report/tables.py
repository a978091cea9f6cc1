"""Result tables: results.md (paper-style, one table per backbone), results.csv and results.json.

A result is a dict ``{"meta": {...}, "backbones": [{...}], "rows": [{...}], "visuals": {...}}`` as made by
:func:`tokenprune.evaluate.run_grid`; a row holds every measured field of one variant (see ROW_FIELDS).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["ROW_FIELDS", "TABLE_COLUMNS", "markdown_report", "markdown_table", "write_csv", "write_json",
           "write_markdown", "budget_label", "group_rows"]

# every field of a row, in the CSV's column order
ROW_FIELDS = [
    "backbone", "model", "method", "label", "unpruned", "budget_mode", "budget", "keep", "token_reduction",
    "token_reduction_simulated", "tokens_per_block", "params", "params_backbone", "gflops", "gflops_paper",
    "gflops_proposal", "top1", "delta_top1", "top5", "images_per_s", "speedup", "peak_mem_mib", "host_over_gpu",
    "samples", "options", "checkpoint_file", "throughput",
]

# (header, row key) of the markdown table; optional columns are dropped when no row of the table has a value
TABLE_COLUMNS = [
    ("Method", "label"), ("Keep", "keep"), ("Token reduction", "token_reduction"), ("Params (M)", "params"),
    ("GFLOPs", "gflops"), ("GFLOPs (ViM paper)", "gflops_paper"), ("Top-1", "top1"),
    ("Δ Top-1", "delta_top1"), ("Top-5", "top5"), ("images/s", "images_per_s"), ("Speed-up", "speedup"),
    ("Peak mem (MiB)", "peak_mem_mib"), ("Host ÷ GPU", "host_over_gpu"),
]
OPTIONAL_COLUMNS = {"gflops", "gflops_paper", "params", "images_per_s", "speedup", "peak_mem_mib", "host_over_gpu"}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt_gflops(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3g}"


def _fmt(key: str, row: Dict[str, Any]) -> str:
    v = row.get(key)
    if key == "label":
        return f"**{v}**" if row.get("unpruned") else str(v)
    if _missing(v):
        return "–"
    if key == "keep":
        return f"{v:.4g}"
    if key == "token_reduction":
        return f"{100 * v:.1f} %"
    if key == "params":
        return f"{v / 1e6:.2f}"
    if key in ("gflops", "gflops_paper"):
        return _fmt_gflops(v)
    if key in ("top1", "top5"):
        return f"{v:.2f}"
    if key == "delta_top1":
        return "–" if row.get("unpruned") else f"{v:+.2f}"
    if key == "images_per_s":
        return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"
    if key == "speedup":
        return f"{v:.2f}×"
    if key == "peak_mem_mib":
        return f"{v:,.0f}"
    if key == "host_over_gpu":
        return f"{v:.2f}"
    return str(v)


def budget_label(mode: Optional[str], budget: Optional[float]) -> str:
    if mode is None or budget is None:
        return "unpruned"
    if mode == "keep":
        return f"keep ratio {budget:g}"
    pct = f"{100 * budget:.4g} %"
    return f"{pct} FLOPs reduction" if mode == "flops" else f"{pct} token reduction"


def group_rows(rows: List[Dict[str, Any]]) -> List[tuple]:
    """[(group label, rows)]: the unpruned row first, then one group per budget in the order first seen."""
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    unpruned = [r for r in rows if r.get("unpruned")]
    for r in rows:
        if r.get("unpruned"):
            continue
        groups.setdefault((r.get("budget_mode"), r.get("budget")), []).append(r)
    out = [("unpruned", unpruned)] if unpruned else []
    out += [(budget_label(*k), g) for k, g in groups.items()]
    return out


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """One backbone's table: unpruned first, then a bold group line per budget (as the PaPr+SS tables)."""
    cols = [(h, k) for h, k in TABLE_COLUMNS
            if k not in OPTIONAL_COLUMNS or any(not _missing(r.get(k)) for r in rows)]
    if all(r.get("gflops_paper") == r.get("gflops") for r in rows):  # ViT: one convention
        cols = [(h, k) for h, k in cols if k != "gflops_paper"]
    right = {"keep", "token_reduction", "params", "gflops", "gflops_paper", "top1", "delta_top1", "top5",
             "images_per_s", "speedup", "peak_mem_mib", "host_over_gpu"}
    lines = ["| " + " | ".join(h for h, _ in cols) + " |",
             "|" + "|".join("---:" if k in right else "---" for _, k in cols) + "|"]
    for label, group in group_rows(rows):
        if label != "unpruned":
            lines.append("| " + " | ".join([f"*{label}*"] + [""] * (len(cols) - 1)) + " |")
        for r in group:
            lines.append("| " + " | ".join(_fmt(k, r) for _, k in cols) + " |")
    return "\n".join(lines)


HOW_TO_READ = """\
**How to read.** *Token reduction* is the fraction of token·blocks saved: 1 − (tokens entering each block,
summed over blocks) / (unpruned tokens × depth), measured from the tokens the model actually ran in the
validation pass (CLS and fused/merged tokens count as tokens). Budgets are per-stage keep ratios (*Keep*) solved
so that this reduction meets the target; one-step methods (PaPr, PaPr+SS, random, L2) keep 1 − target of the
patches, the convention of the PaPr+SS tables, so their measured value differs slightly because the CLS token
is never pruned. *GFLOPs*: fvcore, one fused multiply-add = one FLOP, batch 1, every op the model runs
(both scan directions of ViM, attention matmuls, the PaPr proposal ConvNet and the reducers);
*GFLOPs (ViM paper)* is the ViM-paper convention (one scan direction: ViM-T/S/B ≈ 1.45 / 5.08 / 18.87).
*Top-1/Top-5* in %, *Δ Top-1* in points against the unpruned row of the same backbone. *images/s*: synthetic
input at a fixed batch, eval mode, inference_mode; all variants of one backbone are timed interleaved in
**one** run, and *Speed-up* = images/s ÷ images/s of the unpruned model in that same run (the unpruned row is 1.00×
by construction). Speed-ups are only comparable within a table. *Peak mem*: CUDA peak allocated memory during
the validation forward at the validation batch size (weights included; not measured on CPU). *Host ÷ GPU* (GPU
runs only): the host's time to queue one forward ÷ the GPU's time to run it without host gaps; above 1 the
model is launch-bound (the GPU waits for Python) and its speed-up is the host's, not the method's."""


def _machine_line(m: Dict[str, Any]) -> str:
    hw = f"GPU {m['gpu']} (CUDA {m.get('cuda')}), " if m.get("gpu") else ""
    return (f"{hw}CPU {m.get('cpu')} ({m.get('cpu_cores')} cores, {m.get('torch_threads')} torch threads); "
            f"torch {m.get('torch')}, timm {m.get('timm')}, tokenprune {m.get('tokenprune')}, "
            f"Python {m.get('python')}; {m.get('platform')}")


def markdown_report(result: Dict[str, Any]) -> str:
    meta = result.get("meta", {})
    name = meta.get("name")
    out = [f"# Training-free token reduction{': ' + name if name else ''}", ""]
    out.append(f"- **Date**: {meta.get('date')}")
    out.append(f"- **Machine**: {_machine_line(meta.get('machine', {}))}")
    tp = meta.get("throughput") or {}
    if tp.get("enabled", True):
        out.append(f"- **Throughput**: device {tp.get('device') or meta.get('machine', {}).get('device')}, "
                   f"{tp.get('dtype')}, batch {tp.get('batch_size')}, {tp.get('warmup')} warm-up + "
                   f"{tp.get('iters')} timed iterations per model, all variants of a backbone interleaved in one run"
                   + ("; timed: the unpruned model and the "
                      + ", ".join(budget_label(meta.get("budget_mode"), r) for r in tp["reductions"])
                      + " rows (the other rows: –)" if tp.get("reductions") is not None else ""))
    else:
        out.append("- **Throughput**: not measured")
    mode = meta.get("budget_mode")
    reds = meta.get("reductions") or []
    if mode == "keep":
        out.append(f"- **Budgets**: keep ratios per stage {reds}")
    else:
        what = "FLOPs reduction" if mode == "flops" else "token reduction"
        out.append(f"- **Budgets**: {what} targets {[f'{100 * r:g} %' for r in reds]}, keep ratio per stage "
                   "solved per method (`tokenprune.evaluate.solve_keep" + ("_for_flops" if mode == "flops" else "")
                   + "`)")
    if meta.get("proposal"):
        out.append(f"- **PaPr proposal network**: `{meta['proposal']}` ({meta.get('proposal_checkpoint') or 'random weights'})")
    out.append(f"- **Validation**: batch {meta.get('batch_size')}, {meta.get('dtype')}"
               + (f", first {meta['max_samples']} samples" if meta.get("max_samples") else ", all samples"))
    if meta.get("command"):
        out.append(f"- **Command**: `{meta['command']}`")
    out += ["", HOW_TO_READ, ""]
    rows = result.get("rows", [])
    for bb in result.get("backbones", []):
        d = bb.get("data", {})
        weights = f"weights `{bb['checkpoint_file']}`" if bb.get("checkpoint_file") else "**random weights** (no checkpoint_file)"
        out.append(f"## {bb['name']}")
        out.append("")
        out.append(f"`{bb['model']}`, {weights}; {bb.get('depth')} blocks, {bb.get('seq_len')} tokens "
                   f"({bb['grid'][0]}×{bb['grid'][1]} patches). Data: `{d.get('val_shards')}`, "
                   f"**{bb.get('samples')} samples** evaluated"
                   + (f" of {d.get('val_samples')}" if d.get("val_samples") else "")
                   + f", resize {d.get('resize_size')} / crop {d.get('image_size')}.")
        skipped = bb.get("skipped_samples") or {}
        if skipped.get("skipped"):
            out.append(f"**{skipped['skipped']} corrupt/unreadable samples were skipped**: {skipped}")
        out.append("")
        out.append(markdown_table([r for r in rows if r["backbone"] == bb["name"]]))
        if bb.get("skipped"):
            out.append("")
            out.append("Not applicable to this backbone (skipped): "
                       + "; ".join(f"{s['label']} ({s['reason']})" for s in bb["skipped"]) + ".")
        out.append("")
    files = [f for f in ("accuracy_vs_gflops.png", "kept_patches.png") if f in (result.get("plots") or [])]
    if files:
        out.append("## Figures")
        out.append("")
        for f in files:
            out.append(f"![{f}]({f})")
        out.append("")
    return "\n".join(out)


def write_markdown(result: Dict[str, Any], path: str) -> str:
    with open(path, "w") as f:
        f.write(markdown_report(result))
    return path


def _csv_value(v):
    if isinstance(v, (list, dict, tuple)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return ""
    return v


def write_csv(rows: Iterable[Dict[str, Any]], path: str) -> str:
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(ROW_FIELDS))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS + extra)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in ROW_FIELDS + extra})
    return path


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def kept_patches_json(visuals: Dict[str, Any]) -> Dict[str, Any]:
    """Kept grid indices (final stage) per backbone, method and image."""
    out = {}
    for bb, vis in (visuals or {}).items():
        out[bb] = {}
        for label, m in vis["methods"].items():
            idx = m["patch_index"]
            out[bb][label] = {"keep": m["keep"], "budget": m["budget"], "token_reduction": m["token_reduction"],
                              "merging": m["merging"],
                              "kept_patch_indices": [sorted(int(i) for i in row if i >= 0) for row in idx.tolist()]}
    return out


def write_json(result: Dict[str, Any], path: str) -> str:
    doc = {"meta": result.get("meta", {}), "backbones": result.get("backbones", []), "rows": result.get("rows", []),
           "kept_patches": kept_patches_json(result.get("visuals"))}
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1)
        f.write("\n")
    return path


def write_tables(result: Dict[str, Any], out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    return [write_markdown(result, os.path.join(out_dir, "results.md")),
            write_csv(result.get("rows", []), os.path.join(out_dir, "results.csv")),
            write_json(result, os.path.join(out_dir, "results.json"))]
