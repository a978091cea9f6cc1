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
