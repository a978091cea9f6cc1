"""Static shapes, captured: budgets are fixed token counts, so a pruned model's shapes depend only on the
input batch shape, and its inference forward can be compiled or replayed from a CUDA graph.

Modes (``PrunedModel.set_compile`` / ``create_model(compile=...)``):
  "none"       eager (the default; CPU CI and anything unusual)
  "compile"    ``torch.compile`` of the whole forward (static shapes; recompiles for a new batch shape)
  "cudagraph"  CUDA-graph capture of the *inference* forward (eval mode, no grad, CUDA input), one graph per
               input shape / dtype / autocast state, replayed afterwards; training, grad mode, CPU input or
               more than ``max_graphs`` shapes run eager. Needs a capturable forward (no host sync, no CPU
               tensors: tests/test_capturable.py) and weights that stay where they are (moving the model
               drops the graphs).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

COMPILE_MODES = ("none", "compile", "cudagraph")


def check_mode(mode: Optional[str]) -> str:
    mode = "none" if mode is None else str(mode)
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {COMPILE_MODES}")
    return mode


class CudaGraphRunner:
    """Replays `fn(x)` from a CUDA graph captured for x's shape (inference only; eager otherwise)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 2, max_graphs: int = 4):
        self.fn, self.warmup, self.max_graphs = fn, warmup, max_graphs
        self.graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None

    @staticmethod
    def _key(x: torch.Tensor) -> Tuple:
        amp = torch.is_autocast_enabled("cuda")
        return (tuple(x.shape), x.dtype, x.device, amp, torch.get_autocast_dtype("cuda") if amp else None,
                torch.is_inference_mode_enabled())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or torch.is_grad_enabled():
            return self.fn(x)
        key = self._key(x)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(x)
            entry = self._capture(x)
            self.graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # lazy initialisation and autotuning happen outside the capture
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        self.pool = graph.pool()
        return graph, static_in, static_out
