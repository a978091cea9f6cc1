"""Lightning training and evaluation: the pruning-aware classifier, its callbacks and the CLI (train.py)."""
from .callbacks import FlopsCallback, RequeueAtStepBoundary, ThroughputCallback
from ..pruning.checkpoint import load_backbone_from_lightning
from .module import PruningClassifier, WarmupCosine

__all__ = ["PruningClassifier", "WarmupCosine", "load_backbone_from_lightning", "FlopsCallback",
           "ThroughputCallback", "RequeueAtStepBoundary"]
