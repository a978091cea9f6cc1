"""tokenprune: token pruning and merging for Vision Mamba, PlainMamba and ViT/DeiT."""
from . import models  # noqa: F401  (registers backbones in timm)
from .pruning import create_model, list_methods

__version__ = "0.1.0"


def count_flops(model, *args, **kwargs):
    """fvcore FLOPs of a model at batch 1 (see tokenprune.flops.count_flops)."""
    from .flops import count_flops as _count
    return _count(model, *args, **kwargs)


__all__ = ["create_model", "list_methods", "count_flops", "__version__"]
