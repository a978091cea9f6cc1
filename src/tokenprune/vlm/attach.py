"""Attach a visual-token reducer to a Hugging Face LLaVA-1.5 or LLaVA-NeXT model.

Only public transformers API is used: the vision tower, projector and image_newline modules, forward hooks
(q/k projections of the feature layer, for the CLS attention row and the keys), and the models' own
`mm_encoder_outputs` argument of forward/generate (pre-encoded image features; generate passes it to the
prefill step only). The model's own merge then checks that the placeholders match the reduced features.

    reduced = attach(model, method="visionzip", budget=64)
    inputs = processor(images=img, text=prompt, return_tensors="pt")   # unreduced placeholders are fine
    out = reduced.generate(**inputs, max_new_tokens=20)

LLaVA-NeXT: the budget is per tile (the base image and each any-resolution tile). The reduced tokens of the
base tile come first, then the grid tiles row by row with one image-newline token closing each row of tiles
(where the unreduced layout closes each row of patches), so the newline still marks the end of a row.
A budget equal to the unreduced tile keeps the model's own layout (unpadding, a newline per patch row).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                image_size_to_num_patches)

from .placeholders import fit_placeholders
from .reduce import ReductionSpec, cls_attention_and_keys, make_spec, reduce_tiles

SUPPORTED = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)


def _feature_layer(config) -> int:
    """The vision_feature_layer as an index into the tower's layers (its output is the feature)."""
    n_layers = config.vision_config.num_hidden_layers
    f = config.vision_feature_layer
    if isinstance(f, bool) or not isinstance(f, int):
        raise ValueError(f"vision_feature_layer must be one int (a list of layers is not supported), got {f!r}")
    # hidden_states[f]: index 0 is the embeddings (no attention to read), i >= 1 the output of layer i - 1
    pos = f if f >= 0 else n_layers + 1 + f
    if not 1 <= pos <= n_layers:
        raise ValueError(f"vision_feature_layer {f} is out of range for a {n_layers}-layer vision tower "
                         f"(expected 1..{n_layers} or -{n_layers}..-1)")
    return pos - 1


class ReducedVLM(nn.Module):
    """A LLaVA model whose visual tokens are reduced before the projector; forward/generate as the model's."""

    def __init__(self, model: nn.Module, method: str = "visionzip", budget: int = 64, *,
                 dominant: Optional[int] = None, contextual: Optional[int] = None, evaluator: Optional[str] = None,
                 mode: str = "add", seed: int = 0):
        super().__init__()
        if not isinstance(model, SUPPORTED):
            raise TypeError(f"unsupported model class {type(model).__name__}; expected one of "
                            f"{[c.__name__ for c in SUPPORTED]}")
        self.model = model
        cfg = model.config
        self.is_next = isinstance(model, LlavaNextForConditionalGeneration)
        self.layer = _feature_layer(cfg)
        self.strategy = cfg.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.strategy!r}; expected 'default' or 'full'")
        tower = model.model.vision_tower
        if type(tower).__name__ != "CLIPVisionModel" or not hasattr(tower, "encoder"):
            raise TypeError(f"vision tower {type(tower).__name__} is not supported; expected CLIPVisionModel "
                            "(its CLS attention row and keys are read from encoder.layers[i].self_attn)")
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)
        self.unreduced = side * side + (1 if self.strategy == "full" else 0)
        self.spec: ReductionSpec = make_spec(method, budget, self.unreduced, dominant=dominant,
                                             contextual=contextual, evaluator=evaluator, mode=mode, seed=seed)
        self.last_kept: Optional[List[torch.Tensor]] = None  # per image: (tiles, budget) grid index, -1 = CLS

    @property
    def attn(self) -> nn.Module:
        """The feature layer's attention (looked up, not registered: the wrapper's state dict stays the model's)."""
        return self.model.model.vision_tower.encoder.layers[self.layer].self_attn

    @property
    def budget(self) -> int:
        return self.spec.budget

    @property
    def reduced(self) -> bool:
        return self.spec.budget < self.unreduced

    # ---- vision side -------------------------------------------------------------------------------
    def _tower(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Feature-layer hidden states (CLS included) and, when the method needs them, its CLS row and keys."""
        captured: Dict[str, torch.Tensor] = {}
        handles = []
        if self.reduced and self.spec.needs_attention:
            for name in ("q_proj", "k_proj"):
                handles.append(getattr(self.attn, name).register_forward_hook(
                    lambda mod, inp, out, name=name: captured.__setitem__(name, out)))
        try:
            out = self.model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        hidden = out.hidden_states[self.layer + 1]
        if not captured:
            return hidden, None, None
        heads = self.model.config.vision_config.num_attention_heads
        cls_attn, keys = cls_attention_and_keys(captured["q_proj"], captured["k_proj"], heads)
        return hidden, cls_attn, keys

    def _tiles(self, pixel_values: torch.Tensor, image_sizes) -> Tuple[torch.Tensor, List[int]]:
        if not self.is_next:
            if pixel_values.dim() != 4:
                raise ValueError(f"LLaVA pixel_values must be (images, 3, H, W), got {tuple(pixel_values.shape)}")
            return pixel_values, [1] * pixel_values.shape[0]
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them)")
        cfg = self.model.config
        n_tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                   for s in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_tiles)])
        return pixel_values, n_tiles

    def encode_images(self, pixel_values: torch.Tensor, image_sizes=None) -> List[torch.Tensor]:
        """Per image, the (tokens, text width) features the LLM gets in place of its placeholders."""
        pixels, n_tiles = self._tiles(pixel_values, image_sizes)
        pixels = pixels.to(self.model.model.vision_tower.dtype)
        hidden, cls_attn, keys = self._tower(pixels)
        x, kept = reduce_tiles(hidden, self.spec, self.grid, cls_attn, keys, feed_cls=self.strategy == "full")
        feats = self.model.model.multi_modal_projector(x)
        self.last_kept = list(kept.detach().cpu().split(n_tiles))
        per_image = list(feats.split(n_tiles))
        if not self.is_next:
            return [f[0] for f in per_image]
        if not self.reduced:  # the model's own any-resolution layout, so the unreduced budget is exact
            packed, _ = self.model.model.pack_image_features(per_image, image_sizes, self.strategy,
                                                            image_newline=self.model.model.image_newline)
            return list(packed)
        return [self._pack_reduced(f, size) for f, size in zip(per_image, image_sizes)]

    def _pack_reduced(self, tiles: torch.Tensor, image_size) -> torch.Tensor:
        newline = self.model.model.image_newline.to(tiles.dtype)[None]
        if tiles.shape[0] == 1:
            return torch.cat([tiles[0], newline])
        cfg = self.model.config
        rows, cols = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        grid = tiles[1:].reshape(rows, cols * tiles.shape[1], -1)
        parts = [tiles[0]]
        for r in range(rows):
            parts += [grid[r], newline]
        return torch.cat(parts)

    def image_token_counts(self, image_sizes=None, n_images: int = 1) -> List[int]:
        """Placeholders per image at this budget (reduced budgets only for NeXT; unreduced NeXT counts come
        from the processor)."""
        if not self.is_next:
            return [self.budget] * n_images
        if not self.reduced:
            raise ValueError("unreduced LLaVA-NeXT placeholder counts depend on unpadding: take them from the "
                             "processor")
        cfg = self.model.config
        counts = []
        for s in image_sizes:
            n = image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            rows = get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)[0]
            counts.append(self.budget + 1 if n == 1 else self.budget * n + rows)
        return counts

    # ---- full model --------------------------------------------------------------------------------
    def prepare(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, image_sizes=None, **kwargs) -> dict:
        """Model inputs with the reduced image features (`mm_encoder_outputs`) and placeholders fitted."""
        if pixel_values is None:
            return dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        feats = self.encode_images(pixel_values, image_sizes)
        counts = [int(f.shape[0]) for f in feats]
        ids, mask = fit_placeholders(input_ids, counts, self.model.config.image_token_id, attention_mask,
                                     pad_token_id=self.pad_token_id)
        mm = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
        return dict(input_ids=ids, attention_mask=mask, mm_encoder_outputs=mm, **kwargs)

    @property
    def pad_token_id(self) -> int:
        pad = self.model.config.text_config.pad_token_id
        return 0 if pad is None else int(pad)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, **kwargs):
        return self.model(**self.prepare(input_ids, pixel_values, attention_mask, image_sizes), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, **kwargs):
        """model.generate on the reduced inputs; returns the fitted prompt ids followed by the new tokens."""
        return self.model.generate(**self.prepare(input_ids, pixel_values, attention_mask, image_sizes), **kwargs)


def attach(model: nn.Module, method: str = "visionzip", budget: int = 64, **options) -> ReducedVLM:
    """Wrap a LlavaForConditionalGeneration / LlavaNextForConditionalGeneration with a visual-token reducer."""
    return ReducedVLM(model, method, budget, **options)


def load(path: str, method: str = "visionzip", budget: int = 64, dtype=None, **options) -> ReducedVLM:
    """from_pretrained(path) of a local llava-hf directory (nothing is downloaded), with a reducer attached."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if cfg.model_type not in classes:
        raise TypeError(f"unsupported model_type {cfg.model_type!r} in {path}; expected one of {sorted(classes)}")
    model = classes[cfg.model_type].from_pretrained(path, local_files_only=True, dtype=dtype).eval()
    return attach(model, method, budget, **options)
