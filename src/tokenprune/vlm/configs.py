"""LLaVA-1.5 / LLaVA-NeXT configs: the real 7B shapes, and small random ones with the real token geometry.

The small configs keep what decides the visual-token count (336 px, patch 14 -> 24 x 24 = 576 patches + CLS,
feature layer -2, "default" select strategy, NeXT's 336-px tiles and grid pinpoints) and shrink everything else
(widths, depths, vocabulary), so the integration runs on a CPU in seconds.
"""
from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama shapes); <image> is id 32000 of 32064.
REAL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
REAL_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
REAL_IMAGE_TOKEN = 32000

SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=336, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=160, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMALL_IMAGE_TOKEN = 150
PAD_TOKEN = 0


def _config(cls, real: bool, vision_layers=None, text_layers=None, **extra):
    vision = dict(REAL_VISION if real else SMALL_VISION)
    text = dict(REAL_TEXT if real else SMALL_TEXT)
    if vision_layers is not None:
        vision["num_hidden_layers"] = vision_layers
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    text.update(pad_token_id=PAD_TOKEN, bos_token_id=1, eos_token_id=2)
    return cls(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
               image_token_index=REAL_IMAGE_TOKEN if real else SMALL_IMAGE_TOKEN, image_seq_length=576,
               projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
               **extra)


def llava15_config(real: bool = False, vision_layers=None, text_layers=None) -> LlavaConfig:
    """LLaVA-1.5 (7B shapes when real=True; vision_layers/text_layers override the depths)."""
    return _config(LlavaConfig, real, vision_layers, text_layers)


def llava_next_config(real: bool = False, vision_layers=None, text_layers=None) -> LlavaNextConfig:
    """LLaVA-NeXT (llava-v1.6 layout): 336-px tiles, the default grid pinpoints up to 672 x 672."""
    return _config(LlavaNextConfig, real, vision_layers, text_layers,
                   image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
