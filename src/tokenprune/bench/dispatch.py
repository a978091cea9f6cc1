"""Device-free proxies for GPU behaviour, read off the aten ops a forward dispatches.

* :class:`OpCounter` counts aten ops (a proxy for kernel launches: on a GPU nearly every compute op is one
  launch, views and metadata ops are none, so those are counted apart).
* :class:`CpuTensorRecorder` records every op that takes or makes a CPU tensor. Run a model whose weights
  and input live on another device (``meta`` works on any machine) and a hit is a per-forward CPU tensor:
  a host -> device copy on a GPU, which stalls the stream and breaks CUDA-graph capture. On ``meta`` a read
  back to the host (``.item()``, ``int(t)``, boolean-mask indexing) raises instead, so the same run also
  proves there is no host synchronisation.
"""
from __future__ import annotations

from collections import Counter
from typing import List

import torch

from ..compat import TorchDispatchMode, tree_leaves

# ops that launch no kernel on a GPU (views, metadata, aliasing)
NO_KERNEL = {"view", "_unsafe_view", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "slice",
             "select", "as_strided", "alias", "detach", "reshape", "split", "split_with_sizes", "unbind",
             "unflatten", "flatten", "narrow", "chunk", "lift_fresh", "_reshape_alias", "diagonal",
             "view_as_real", "view_as_complex", "_to_copy_noop", "clone_noop", "promote_types", "result_type"}


def _base_name(func) -> str:
    return func.__name__.split(".")[0]


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched inside the context: ``total``, ``kernels`` (without views/metadata ops)
    and ``by_op`` (a Counter of op names)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_op[_base_name(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.by_op.items() if op not in NO_KERNEL)


class CpuTensorRecorder(TorchDispatchMode):
    """Records ``hits``: the names of ops with a CPU tensor among their arguments or results."""

    def __init__(self):
        super().__init__()
        self.hits: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves((args, kwargs, out))):
            self.hits.append(str(func))
        return out
