"""Display labels of the grid's methods (report rows, plot legends, `methods:` selections of a backbone).

Imported by config.py (selecting a backbone's methods by label) and variants.py (labelling the variants);
it imports neither (not even for type hints), so the evaluate package has no import cycle.
"""
from __future__ import annotations

from typing import Any

__all__ = ["DISPLAY_NAMES", "EVALUATOR_NAMES", "method_label", "scorer_label"]

DISPLAY_NAMES = {
    "random": "Random", "l2": "L2-norm (naive)", "evit": "EViT", "tome": "ToMe", "pumer": "PuMer", "utr": "UTR",
    "top": "ToP", "hsa": "ToP+HSA", "papr": "PaPr", "papr_ss": "PaPr+SS", "visionzip": "VisionZip",
}
EVALUATOR_NAMES = {"l2": "L2", "attn_received": "attention-received", "random": "random"}


def method_label(entry: Any) -> str:
    """Display label of a ``config.MethodEntry`` (name, method, options): the entry's name, else the preset's
    display name plus its options."""
    if entry.name:
        return entry.name
    base = DISPLAY_NAMES.get(entry.method, entry.method)
    opts = dict(entry.options)
    if entry.method == "papr_ss":
        opts.setdefault("smoothing", 3)
    parts = []
    for k, v in opts.items():
        if k == "smoothing":
            parts.append(f"k={v}")
        else:
            parts.append(f"{k}={v}")
    return f"{base} ({', '.join(parts)})" if parts else base


def scorer_label(label: str, model: Any) -> str:
    """``label`` naming the scorer that really ran when create_model replaced a CLS-based evaluator on a backbone
    without a CLS (PuMer on PlainMamba: "PuMer (L2 scorer)"); ``label`` itself otherwise."""
    sub = getattr(model, "evaluator_substitution", None)
    if not sub:
        return label
    note = f"{EVALUATOR_NAMES.get(sub['used'], sub['used'])} scorer"
    return f"{label[:-1]}, {note})" if label.endswith(")") else f"{label} ({note})"
