"""The entry-point builders shared by every backbone's timm registry file (ViM, PlainMamba, ViT, proposal).

Weights are never downloaded: a cfg names the official file and where to get it (its `notes`) but carries no
url / hf_hub_id, so `pretrained=True` needs a local copy, given as timm's
`pretrained_cfg_overlay=dict(file=PATH)` or our `checkpoint_file=PATH`. Both take one path: the file is read
here (official layouts: weights under `model` / `state_dict`, EMA on request, and files with pickled
argparse objects, which timm's weights-only reader refuses), handed to timm as the cfg's `state_dict`,
mapped by the model's `pretrained_filter_fn` and checked key by key (every missing, unexpected or mis-shaped
key in one error) before timm loads it; timm drops the classifier when num_classes differs from the cfg's,
as it does for its own models.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from timm.models import build_model_with_cfg

from .checkpoint import check_fits, load_checkpoint_file

ReadFn = Callable[[str, bool], Tuple[Dict[str, torch.Tensor], Callable]]


def official_cfg(*, official_file: Optional[str], weights_url: Optional[str], origin_url: str, paper_name: str,
                 paper_ids: str, first_conv: str, license: Optional[str] = None, num_classes: int = 1000,
                 input_size=(3, 224, 224), pool_size=None, **extra) -> dict:
    """A timm pretrained cfg with ImageNet eval settings (bicubic, crop 0.875, ImageNet mean/std) and the
    official file named in `notes`; no url, so timm never downloads anything."""
    notes = ("weights are never downloaded: load a local file with pretrained=True, "
             "pretrained_cfg_overlay=dict(file=PATH) (or checkpoint_file=PATH)",)
    if official_file:
        notes = (f"official weights file: {official_file}", f"official weights from: {weights_url}") + notes
    cfg = dict(url="", num_classes=num_classes, input_size=input_size, pool_size=pool_size, crop_pct=0.875,
               interpolation="bicubic", fixed_input_size=True, mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225), first_conv=first_conv, classifier="head", license=license,
               origin_url=origin_url, paper_name=paper_name, paper_ids=paper_ids, notes=notes)
    cfg.update(extra)
    return cfg


def official_file_of(cfg) -> Optional[str]:
    """The official weights file a cfg names (None for our CPU-sized variants)."""
    for note in (getattr(cfg, "notes", None) or ()):
        if note.startswith("official weights file: "):
            return note[len("official weights file: "):]
    return None


def _missing_weights_message(variant: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(variant)
    notes = dict(n.split(": ", 1) for n in (getattr(cfg, "notes", None) or ()) if ": " in n)
    what = (f"a local copy of the official weights {notes['official weights file']} "
            f"({notes.get('official weights from', '?')})" if "official weights file" in notes
            else "a local weights file (no official weights exist for this CPU-sized variant)")
    return (f"{variant}: pretrained=True needs {what}; pass pretrained_cfg_overlay=dict(file=PATH) or "
            "checkpoint_file=PATH. Weights are never downloaded at run time.")


def checked_filter(filter_fn: Callable, source: str) -> Callable:
    """The model's filter, then a key-by-key check (the classifier is left to timm when num_classes differs
    from the cfg's: timm drops it and loads the rest)."""
    def fn(state_dict, model):
        state_dict = filter_fn(state_dict, model)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        ignore: Sequence[str] = ()
        if cfg.get("num_classes") is not None and model.num_classes != cfg["num_classes"]:
            ignore = tuple(f"{c}.{p}" for c in (cfg.get("classifier") or "head",) for p in ("weight", "bias"))
        check_fits(model, state_dict, source, ignore=ignore)
        return state_dict
    return fn


def build_backbone(cls, variant: str, pretrained: bool, kwargs: dict, *, filter_fn: Callable, read_fn: ReadFn,
                   out_indices: Sequence[int]):
    """timm entry point: build_model_with_cfg with our local-only loading (see the module docstring).

    kwargs may hold `checkpoint_file=` (same as pretrained=True with pretrained_cfg_overlay=dict(file=...))
    and `use_ema=` (take the file's EMA weights); features_only / out_indices / feature_cls are timm's.
    """
    checkpoint_file = kwargs.pop("checkpoint_file", None)
    use_ema = bool(kwargs.pop("use_ema", False))
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if checkpoint_file:
        if overlay.get("file") not in (None, checkpoint_file):
            raise ValueError(f"{variant}: checkpoint_file={checkpoint_file!r} and pretrained_cfg_overlay file="
                             f"{overlay['file']!r} name two different files; give one")
        overlay["file"] = str(checkpoint_file)
        pretrained = True
    source = overlay.get("file") or "pretrained_cfg_overlay['state_dict']"
    if pretrained and overlay.get("state_dict") is None:
        if not overlay.get("file"):
            raise ValueError(_missing_weights_message(variant))
        overlay["state_dict"], filter_fn = read_fn(str(overlay["file"]), use_ema)
    elif use_ema:
        raise ValueError(f"{variant}: use_ema=True needs a weights file (checkpoint_file= or "
                         "pretrained_cfg_overlay=dict(file=...))")
    model = build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checked_filter(filter_fn, source),
                                 pretrained_cfg_overlay=overlay or None,
                                 feature_cfg=dict(feature_cls="getter", out_indices=tuple(out_indices)), **kwargs)
    for m in (model, getattr(model, "model", None)):  # the cfg must not keep the loaded tensors alive
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("state_dict") is not None:
            cfg["state_dict"] = None
    return model


def quarter_indices(depth: int) -> Tuple[int, ...]:
    """Default features_only blocks: the ends of the four quarters (PlainMamba's dense-prediction choice,
    e.g. 5, 11, 17, 23 of 24 blocks)."""
    return tuple(sorted({max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)}))


TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_with_checkpoint(cls, filter_fn, defaults: dict, pretrained: bool = False,
                          checkpoint_file: Optional[str] = None, use_ema: bool = False, **kwargs):
    """Build a model and load a local official-layout file; nothing is ever downloaded."""
    for key in TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if pretrained and not checkpoint_file:
        raise ValueError(f"{cls.__name__}: pretrained=True needs checkpoint_file=<path to the official .pth>; "
                         "weights are never downloaded at run time")
    model = cls(**{**defaults, **kwargs})
    if checkpoint_file:
        load_checkpoint_file(model, checkpoint_file, filter_fn, use_ema=use_ema)
    return model
