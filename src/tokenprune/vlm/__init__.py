"""Visual-token reduction (VisionZip and the library's other reducers) in Hugging Face LLaVA models.

Needs the optional extra: pip install -e .[vlm]  (transformers, pinned).
"""
from .attach import ReducedVLM, attach, load
from .reduce import METHODS, ReductionSpec, default_contextual, make_spec, reduce_tiles

__all__ = ["ReducedVLM", "attach", "load", "METHODS", "ReductionSpec", "default_contextual", "make_spec",
           "reduce_tiles"]
