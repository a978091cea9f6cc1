"""Reports of an evaluation grid: tables (results.md / .csv / .json) and plots (accuracy vs GFLOPs, kept patches).

    from tokenprune.report import write_report
    files = write_report(result, "reports/my_run")   # result as made by tokenprune.evaluate.run_grid
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from .plots import plot_accuracy_vs_gflops, plot_kept_patches
from .tables import ROW_FIELDS, TABLE_COLUMNS, markdown_report, markdown_table, write_csv, write_json, write_tables

__all__ = ["write_report", "write_tables", "markdown_report", "markdown_table", "write_csv", "write_json",
           "plot_accuracy_vs_gflops", "plot_kept_patches", "ROW_FIELDS", "TABLE_COLUMNS"]


def write_report(result: Dict[str, Any], out_dir: str, redraw_kept_patches: bool = True) -> List[str]:
    """Write every report file into out_dir; returns their paths (plots first, so results.md can link them).

    ``redraw_kept_patches=False`` keeps the kept_patches.png that an earlier call drew for this same result:
    the grid rewrites the report after every backbone, and that figure (seconds to draw) only changes when a
    backbone adds pictures."""
    os.makedirs(out_dir, exist_ok=True)
    plots = []
    p = plot_accuracy_vs_gflops(result.get("rows", []), os.path.join(out_dir, "accuracy_vs_gflops.png"))
    if p:
        plots.append(p)
    path = os.path.join(out_dir, "kept_patches.png")
    drawn_for_this_result = "kept_patches.png" in result.get("plots", []) and os.path.isfile(path)
    kept = path if drawn_for_this_result else None
    if redraw_kept_patches or not drawn_for_this_result:
        grids = {b["name"]: tuple(b["grid"]) for b in result.get("backbones", [])}
        kept = plot_kept_patches(result.get("visuals") or {}, grids, path)
        if kept is None and os.path.isfile(path):
            os.remove(path)  # an earlier run's figure would be linked as this one's
    if kept:
        plots.append(kept)
    result["plots"] = [os.path.basename(p) for p in plots]
    return write_tables(result, out_dir) + plots
