"""Reading official checkpoint files and loading them strictly, with errors that list what does not fit."""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch
from timm.models import clean_state_dict

# Official files nest the weights under one of these keys (DeiT/ViM: model, mmcv/PlainMamba: state_dict).
NESTED_KEYS = ("model", "state_dict", "module")
EMA_KEYS = ("model_ema", "state_dict_ema")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model."""


def torch_load_trusted(path: str):
    """torch.load of a local file: weights_only first; official training scripts pickle an argparse
    Namespace (and Lightning its hyper-parameters) beside the weights, which weights_only refuses, so then a
    full unpickle of this trusted local file, with a warning."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling refusal
        warnings.warn(f"{path}: not loadable with weights_only=True; unpickling it fully (trusted local file)")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Return the flat state dict of a checkpoint file in any of the official layouts.

    Accepts a bare state dict, or a dict with the weights under `model` / `state_dict` (and `model_ema` /
    `state_dict_ema` when use_ema).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    ckpt = torch_load_trusted(path)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict of tensors or a dict holding one, got {type(ckpt)}")
    if use_ema and not any(isinstance(ckpt.get(k), dict) for k in EMA_KEYS):
        raise CheckpointMismatchError(f"{path}: use_ema=True but the file has none of {EMA_KEYS} "
                                      f"(top-level keys: {sorted(ckpt)[:20]})")
    for key in (EMA_KEYS if use_ema else ()) + NESTED_KEYS:
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    tensors = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"{path}: no tensors found (top-level keys: {sorted(ckpt)[:20]})")
    return clean_state_dict(tensors)


def check_fits(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint",
               ignore: Sequence[str] = ()) -> None:
    """Raise one CheckpointMismatchError that lists every missing, unexpected and mis-shaped key (keys in
    `ignore` are left out: a classifier that timm drops when num_classes differs from the file's)."""
    own = {k: v for k, v in model.state_dict().items() if k not in ignore}
    state_dict = {k: v for k, v in state_dict.items() if k not in ignore}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        def fmt(items):
            return "\n    ".join(items[:40]) + (f"\n    ... and {len(items) - 40} more" if len(items) > 40 else "")
        parts = [f"{source} does not fit {type(model).__name__}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}):\n    {fmt(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}):\n    {fmt(unexpected)}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}):\n    {fmt(shapes)}")
        raise CheckpointMismatchError("\n".join(parts))


def load_strict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict(strict=True) with one error that lists every missing, unexpected and mis-shaped key."""
    check_fits(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint_file(model: torch.nn.Module, path: str, filter_fn: Optional[Callable] = None,
                         use_ema: bool = False) -> torch.nn.Module:
    """Read an official-layout file, map its keys with the model's filter and load strictly."""
    state_dict = read_state_dict(path, use_ema=use_ema)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    load_strict(model, state_dict, source=path)
    return model


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values): tells whether two builds of a
    network, e.g. a distillation teacher rebuilt from its file on resume, hold the same weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
