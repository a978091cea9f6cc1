"""Reading the starting weights of a pruned model: Lightning checkpoints of a ``PruningClassifier`` run and
official-layout files.

* :func:`is_lightning_checkpoint` tells a Lightning ``.ckpt`` (``state_dict`` + a Lightning version key) from
  an official weights file;
* :func:`pruned_model_state` takes the ``PrunedModel`` state dict (``model.*`` or, with EMA, ``ema.module.*``)
  out of such a checkpoint, :func:`load_backbone_from_lightning` loads its backbone strictly;
* :func:`official_checkpoint_kwargs` gives the ``timm.create_model`` arguments that load an official-layout
  file strictly, never downloading.

Plain dictionaries and tensors only: nothing here imports Lightning (nor tokenprune.lit / tokenprune.evaluate),
so exporters and evaluation read checkpoints without a trainer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import timm
import torch

from ..models.checkpoint import CheckpointMismatchError, load_strict, torch_load_trusted

if TYPE_CHECKING:
    from .stage import PrunedModel

__all__ = ["LIGHTNING_VERSION_KEYS", "is_lightning_checkpoint", "pruned_model_state",
           "load_backbone_from_lightning", "official_checkpoint_kwargs"]

LIGHTNING_VERSION_KEYS = ("pytorch-lightning_version", "lightning_version")


def is_lightning_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and any(k in obj for k in LIGHTNING_VERSION_KEYS)


def pruned_model_state(ckpt: dict, path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The ``PrunedModel`` state dict (keys ``backbone.*``, ``stages.*``) inside a Lightning checkpoint of a
    ``PruningClassifier`` run: its ``model.*`` entries (``ema.module.*`` with use_ema) with the prefix removed."""
    sd = ckpt["state_dict"]
    prefix = "ema.module." if use_ema else "model."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        tops = sorted({k.split(".", 1)[0] for k in sd})
        if use_ema:
            raise CheckpointMismatchError(
                f"{path}: checkpoint_use_ema=True but this Lightning checkpoint has no EMA weights "
                f"(no 'ema.module.*' keys; top-level prefixes: {tops}); was the run trained with model.ema_decay?")
        raise CheckpointMismatchError(
            f"{path}: a Lightning checkpoint without 'model.*' weights (top-level prefixes: {tops}); "
            "expected a checkpoint written by tokenprune.lit.PruningClassifier")
    return out


def load_backbone_from_lightning(model: "PrunedModel", path: str, use_ema: bool = False,
                                 ckpt: Optional[dict] = None) -> None:
    """Load the backbone weights of an earlier ``PruningClassifier`` run into ``model.backbone``, strictly.

    Only ``backbone.*`` is taken: the reduction stages of the earlier run may differ (another method, keep
    ratio or proposal network); the proposal network comes from ``proposal_checkpoint``.
    """
    ckpt = torch_load_trusted(path) if ckpt is None else ckpt
    state = pruned_model_state(ckpt, path, use_ema)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointMismatchError(f"{path}: no 'model.backbone.*' weights in this Lightning checkpoint")
    load_strict(model.backbone, backbone, source=f"{path} (Lightning checkpoint, "
                                                 f"{'ema.module' if use_ema else 'model'}.backbone.*)")


def _registered_by_tokenprune(name: str) -> bool:
    try:
        fn = timm.models.model_entrypoint(name)
    except Exception:  # noqa: BLE001 - unknown names are reported by create_model
        return False
    return getattr(fn, "__module__", "").startswith("tokenprune")


def official_checkpoint_kwargs(backbone: str, path: str, use_ema: bool = False) -> Dict[str, Any]:
    """timm.create_model kwargs that load an official-layout file strictly, never downloading.

    tokenprune's backbones (ViM, PlainMamba, small DeiTs) take ``checkpoint_file``; stock timm models load a
    local file through ``pretrained=True`` + ``pretrained_cfg_overlay={"file": path}`` (timm's filter is applied).
    """
    if _registered_by_tokenprune(backbone):
        return {"checkpoint_file": path, **({"use_ema": True} if use_ema else {})}
    if use_ema:
        raise ValueError(f"checkpoint_use_ema=True is only supported for tokenprune's backbones and Lightning "
                         f"checkpoints, not the timm model {backbone!r}")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": path}}
