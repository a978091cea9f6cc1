"""One table from the runs of a grid: ``slurm/ablation_array.sbatch`` writes run *name* of a grid into
``<root>/<name>/`` (``logs/version_<k>/metrics.csv`` and ``config.yaml``); this reads the newest version of each
run and writes ``results.md`` and ``results.csv`` (the columns of :mod:`tokenprune.report.tables`).

    python -m tokenprune.lit.gather runs/vim_s_papr_vs_ss            # prints the table, writes the files there
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
from typing import Any, Dict, List, Optional

import yaml

from ..report.tables import markdown_table, write_csv

# metrics.csv column -> row field (top-1 / top-5 in %, as the evaluation tables)
METRICS = {"val/top1": "top1", "val/top5": "top5", "val/loss": "val_loss", "flops/gflops": "gflops",
           "flops/gflops_paper": "gflops_paper", "flops/token_reduction": "token_reduction",
           "throughput/images_per_s": "images_per_s", "throughput/speedup": "speedup"}


def _newest_version(run_dir: str) -> Optional[str]:
    versions = [d for d in glob.glob(os.path.join(run_dir, "logs", "version_*"))
                if os.path.isfile(os.path.join(d, "metrics.csv"))]
    return max(versions, key=lambda d: int(d.rsplit("_", 1)[1])) if versions else None


def read_run(run_dir: str) -> Optional[Dict[str, Any]]:
    """The row of one run (the last logged value of each metric), or None when it has no metrics yet."""
    version = _newest_version(run_dir)
    if version is None:
        return None
    last: Dict[str, float] = {}
    with open(os.path.join(version, "metrics.csv"), newline="") as f:
        for rec in csv.DictReader(f):
            last.update({k: float(v) for k, v in rec.items() if k in METRICS and v not in ("", None)})
    model: Dict[str, Any] = {}
    cfg_path = os.path.join(version, "config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            model = (yaml.safe_load(f) or {}).get("model") or {}
    row = {"label": os.path.basename(os.path.normpath(run_dir)), "backbone": model.get("backbone"),
           "method": model.get("method"), "keep": model.get("keep"), "run_dir": run_dir, "version": version}
    for key, field in METRICS.items():
        if key in last:
            row[field] = 100 * last[key] if field in ("top1", "top5") else last[key]
    return row


def gather(root: str) -> List[Dict[str, Any]]:
    """Rows of every run under ``root`` that has metrics, by name."""
    rows = [read_run(d) for d in sorted(glob.glob(os.path.join(root, "*"))) if os.path.isdir(d)]
    return [r for r in rows if r is not None]


def main(argv=None) -> List[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the grid's run root, e.g. runs/<grid name>")
    p.add_argument("--out", help="folder for results.md / results.csv (default: root)")
    args = p.parse_args(argv)
    rows = gather(args.root)
    if not rows:
        raise SystemExit(f"no run with logs/version_*/metrics.csv under {args.root!r}")
    out = args.out or args.root
    os.makedirs(out, exist_ok=True)
    table = markdown_table(rows)
    md = os.path.join(out, "results.md")
    with open(md, "w") as f:
        f.write(f"# {os.path.basename(os.path.normpath(args.root))}\n\n{table}\n")
    print(table)
    return [md, write_csv(rows, os.path.join(out, "results.csv"))]


if __name__ == "__main__":
    main()
