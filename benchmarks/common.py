"""Shared bits of the benchmark scripts: machine description and appending results with date and command."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import timm
import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def header(title: str) -> str:
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    return (f"## {title}\n\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"- machine: {machine()}\n- torch {torch.__version__}, timm {timm.__version__}\n- command: `{cmd}`\n")


def append_results(path: str, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text.rstrip() + "\n\n")
    print(f"appended to {path}")


BACKBONES = {"vim_s": "vim_small_patch16_224", "deit_s": "deit_small_patch16_224",
             "plainmamba_l3": "plainmamba_l3"}
TINY_BACKBONES = {"vim_s": "vim_test_patch4_32", "deit_s": "deit_test_patch4_32", "plainmamba_l3": "plainmamba_test_32"}


def presets_for(backbone) -> list:
    """Every preset that runs on this (built) backbone, by name."""
    from tokenprune.pruning import METHODS
    from tokenprune.pruning.methods import inapplicable_reason
    return [m for m in sorted(METHODS) if inapplicable_reason(m, backbone) is None]


def build_variant(base, method, reduction: float, proposal=None):
    """tokenprune.create_model at the per-stage keep whose simulated token reduction is `reduction`
    (solve_keep: one-step presets keep 1 - reduction, multi-stage ones less per stage). Returns (model, keep)."""
    import tokenprune
    from tokenprune.evaluate.budget import solve_keep
    if method is None or reduction == 0:
        return tokenprune.create_model(base), 1.0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keep = solve_keep(base, method, reduction, proposal=proposal)
    return tokenprune.create_model(base, method, keep=keep, proposal=proposal), keep
