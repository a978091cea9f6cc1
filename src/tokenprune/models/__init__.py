"""Backbones with the token interface; importing registers them in timm's registry."""
from . import proposal, vim_registry, vit_registry  # noqa: F401  (registration side effects)
from .base import TokenBackbone
from .checkpoint import CheckpointMismatchError, load_checkpoint_file, read_state_dict
from .vim import VisionMamba
from .vit import TimmViT

try:  # PlainMamba lands in its own module
    from . import plainmamba_registry  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["TokenBackbone", "VisionMamba", "TimmViT", "CheckpointMismatchError", "load_checkpoint_file",
           "read_state_dict"]
