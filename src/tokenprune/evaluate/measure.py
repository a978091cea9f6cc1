"""Measurements of the evaluation grid besides accuracy: parameter counts, FLOPs (fvcore), input size,
throughput (one interleaved `compare_throughput` run per backbone). The machine description is
tokenprune.bench.throughput.machine_info.

Re-exported by tokenprune.evaluate.grid.
"""
from __future__ import annotations

import re
from typing import Any, Dict

import torch
from torch import nn

from .config import ThroughputConfig

__all__: list = []


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


