"""Export the backbone of a ``PruningClassifier`` Lightning checkpoint as an official-layout weights file.

The file holds ``{"model": <the timm model's state dict>, "meta": {...}}`` -- the layout of the official
DeiT / ViM releases -- so ``timm.create_model(name, checkpoint_file=...)`` (tokenprune's backbones),
``eval.py`` backbone entries and ``--model.checkpoint_file`` all load it strictly, without Lightning.
The shipped digits models under ``weights/digits`` were written with::

    python -m tokenprune.lit.export runs/vim_micro/checkpoints/last.ckpt weights/digits/vim_micro.pth
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional

import torch

from ..models.checkpoint import CheckpointMismatchError, load_strict, torch_load_trusted
from ..pruning.checkpoint import pruned_model_state
from ..pruning.methods import PlainClassifier, as_backbone

__all__ = ["unwrap_backbone", "export_backbone"]


def unwrap_backbone(backbone: torch.nn.Module) -> torch.nn.Module:
    """The plain timm module inside a token backbone wrapper (TimmViT -> its ViT; ViM/PlainMamba as is)."""
    from ..models.vit import TimmViT

    if isinstance(backbone, TimmViT):
        return backbone.vit
    if isinstance(backbone, PlainClassifier):
        return backbone.model
    return backbone


def _best_score(ckpt: dict, name: str) -> Optional[float]:
    """The best value of ``name`` kept by a ModelCheckpoint that monitors it (None without one)."""
    for state in ckpt.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("monitor") == name and state.get("current_score") is not None:
            return float(state["current_score"])
    return None


def export_backbone(ckpt_path: str, out_path: str, use_ema: bool = False) -> Dict[str, Any]:
    """Write the backbone of ``ckpt_path`` to ``out_path``; returns the metadata stored beside the weights."""
    ckpt = torch_load_trusted(ckpt_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointMismatchError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict/hyper_parameters)")
    hp = ckpt["hyper_parameters"]
    name = hp.get("backbone")
    if not name:
        raise CheckpointMismatchError(f"{ckpt_path}: its hyper-parameters name no backbone")
    # the architecture only: weights come from the checkpoint, never from the files the run started from
    kwargs = {k: v for k, v in dict(hp.get("model_kwargs") or {}).items()
              if k not in ("checkpoint_file", "pretrained", "pretrained_cfg_overlay", "use_ema")}
    if hp.get("num_classes") is not None:
        kwargs["num_classes"] = int(hp["num_classes"])
    backbone = as_backbone(name, allow_plain=True, **kwargs)
    state = pruned_model_state(ckpt, ckpt_path, use_ema)
    weights = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    load_strict(backbone, weights, source=f"{ckpt_path} (backbone)")
    module = unwrap_backbone(backbone)
    meta = {"backbone": name, "source": os.path.basename(ckpt_path), "epoch": int(ckpt.get("epoch", -1)),
            "global_step": int(ckpt.get("global_step", -1)), "ema": bool(use_ema)}
    best = _best_score(ckpt, "val/top1")
    if best is not None:
        meta["best_val_top1"] = best
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # contiguous fp32 copies: the file must not keep views of (larger) shared storages
    torch.save({"model": {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()},
                "meta": meta}, out_path)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenprune.lit.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="Lightning checkpoint of a train.py run (e.g. runs/x/checkpoints/last.ckpt)")
    p.add_argument("out", help="weights file to write (.pth)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs with model.ema_decay)")
    a = p.parse_args(argv)
    meta = export_backbone(a.checkpoint, a.out, use_ema=a.ema)
    size = os.path.getsize(a.out) / 2**20
    print(f"wrote {a.out} ({size:.2f} MiB): {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
