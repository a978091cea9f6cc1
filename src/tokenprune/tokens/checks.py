"""When the ops validate tensor *values* (index ranges, repeated indices, equal protected counts per row).

Reading a value back to the host stalls an accelerator once per check and breaks CUDA-graph capture, so by
default ("auto") value checks run only on CPU tensors, where they cost no synchronisation. Shape and type
checks always run. Set TOKENPRUNE_VALUE_CHECKS=always to debug on a GPU, or =never (or the
``value_checks("never")`` context) to count ops as a GPU runs them.
"""
from __future__ import annotations

import contextlib
import os

import torch

MODES = ("auto", "always", "never")
_mode = os.environ.get("TOKENPRUNE_VALUE_CHECKS", "auto")
if _mode not in MODES:
    raise ValueError(f"TOKENPRUNE_VALUE_CHECKS={_mode!r}; expected one of {MODES}")


def check_values(t: torch.Tensor) -> bool:
    """Whether to validate the values of `t` (reads them back to the host; never inside torch.compile,
    where a read-back would break the graph)."""
    if _mode == "auto":
        return t.device.type == "cpu" and not torch.compiler.is_compiling()
    return _mode == "always"


@contextlib.contextmanager
def value_checks(mode: str):
    """Temporarily set the value-check mode (auto, always, never)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"unknown value-check mode {mode!r}; expected one of {MODES}")
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old
