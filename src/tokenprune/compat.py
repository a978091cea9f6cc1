"""Every use of a private API of torch, timm, Lightning or transformers, in one place.

Private names can change in any release, so each one is wrapped here with the version it was written
against and the reason no public API serves (tests/test_layers.py checks that no other module reaches
into private names). Pinned versions: pyproject.toml. Written against torch 2.11-2.14, timm 1.0.31,
lightning 2.6.6, transformers 5.23.0.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

# torch.utils._python_dispatch (torch 2.x): TorchDispatchMode is the only way to see every aten op a call
# dispatches (op counts as a device-free launch proxy, CPU-tensor detection); there is no public twin.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402,F401

# torch.utils._pytree (torch 2.x): flattens an op's nested (args, kwargs, out) inside a dispatch mode;
# torch.utils.pytree is public only from 2.6 on and re-exports the same function.
from torch.utils._pytree import tree_leaves  # noqa: E402,F401


def feature_take_indices(num_features: int, indices=None):
    """timm's rule for `forward_intermediates(indices=...)` (ints = last n, sequences = those blocks,
    negatives from the end). timm 1.0.31 defines it in the private `timm.models._features` and every timm
    model calls it; using it keeps our backbones' index semantics identical to timm's."""
    from timm.models._features import feature_take_indices as take
    return take(num_features, indices)


def vit_pos_embed(vit, x: torch.Tensor) -> torch.Tensor:
    """timm `VisionTransformer._pos_embed` (timm 1.0.31): adds the position embedding and prepends the
    class/register tokens, with timm's options (no_embed_class, dynamic_img_size, ...). It is private but
    the only way to run exactly timm's embedding between `patch_embed` and `patch_drop`."""
    return vit._pos_embed(x)


def version_counter(t: torch.Tensor) -> int:
    """A tensor's in-place version counter (`Tensor._version`, torch 2.x): the only host-side signal that a
    parameter was modified in place (optimizer steps, `load_state_dict`), read without a device sync."""
    return t._version


def cuda_spin(cycles: int) -> None:
    """Keep the current CUDA stream busy for ``cycles`` GPU clock cycles (`torch.cuda._sleep`, torch 2.x): the
    only device-side wait in torch without a custom kernel; tokenprune.bench.host_time queues a forward behind
    it so CUDA events time the forward's kernels without host gaps."""
    torch.cuda._sleep(int(cycles))


def jit_tracing_state():
    """The active `torch.jit.trace` state, or None (`torch._C._get_tracing_state`, torch 2.x). fvcore counts
    FLOPs on a jit trace; our scan's autograd Function must know whether it is being traced."""
    return torch._C._get_tracing_state()


def set_jit_tracing_state(state) -> None:
    """Suspend (None) or restore the jit tracing state (`torch._C._set_tracing_state`, torch 2.x): the
    scan's inner ops need not be recorded when fvcore traces without grad (halves a ViM's counting time)."""
    torch._C._set_tracing_state(state)


def hf_model_from_config(model_cls, config, dtype: torch.dtype):
    """A Hugging Face model built from a config directly in `dtype` (`PreTrainedModel._from_config`,
    transformers 5.x). The public route (`AutoModel.from_config`) goes through the auto-class mapping,
    which our explicit LLaVA classes do not need; building in bf16 halves the memory of the 7B shapes."""
    return model_cls._from_config(config, dtype=dtype)


def cluster_environment(trainer) -> Any:
    """The trainer's cluster environment (`trainer._accelerator_connector.cluster_environment`, lightning
    2.6.6). `trainer.strategy.cluster_environment` exists only for parallel strategies; the requeue guard
    must also see SLURM on a single-device run."""
    return trainer._accelerator_connector.cluster_environment


def slurm_requeue_handler(trainer) -> Optional[Callable]:
    """Lightning's SLURM requeue handler (`trainer._signal_connector._slurm_sigusr_handler_fn`, lightning
    2.6.6): it saves the requeue checkpoint and calls `scontrol requeue`. When train.py holds the signal from
    start-up, Lightning installs no handler, and the guard calls this function itself at a step boundary."""
    return getattr(trainer._signal_connector, "_slurm_sigusr_handler_fn", None)
