"""Analytic prefill cost of a LLaVA model: FLOPs (one multiply-add = one FLOP, docs/CONVENTIONS.md) and KV-cache
bytes, from the config alone.

Vision tower (CLIP, every tile, all L_v layers run; T = P + 1 tokens of width D_v, MLP width F_v, patch p):
    P * 3 p^2 D_v  (patch embedding)  +  L_v * (4 T D_v^2 + 2 T^2 D_v + 2 T D_v F_v)
Projector (on the visual tokens the LLM gets, n_vis):  n_vis * (D_v D_t + D_t^2)
LLM prefill over n = n_vis + n_text tokens (width d, query width d_q = heads * head_dim, key/value width
d_kv = kv_heads * head_dim, SwiGLU MLP width F, vocabulary V; logits of the last token only, as generate):
    L_t * (n (2 d d_q + 2 d d_kv) + 2 n^2 d_q + 3 n d F)  +  d V
The attention matmuls (QK^T and AV) are counted over the full n x n square, as a dense kernel computes them.
The reducer itself (a CLS row, a cosine matrix of the non-dominant tokens) is left out: under 0.1 % here.
KV cache after prefill: 2 * L_t * n * d_kv * bytes per element.
"""
from __future__ import annotations

from typing import Dict


def _text_dims(tc):
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    return tc.hidden_size, tc.num_attention_heads * hd, kv * hd


def vision_flops(config, n_tiles: int = 1) -> int:
    vc = config.vision_config
    P = (vc.image_size // vc.patch_size) ** 2
    T, D = P + 1, vc.hidden_size
    per_layer = 4 * T * D * D + 2 * T * T * D + 2 * T * D * vc.intermediate_size
    return n_tiles * (P * 3 * vc.patch_size ** 2 * D + vc.num_hidden_layers * per_layer)


def llm_prefill_flops(config, n_tokens: int) -> int:
    tc = config.text_config
    d, dq, dkv = _text_dims(tc)
    n = n_tokens
    per_layer = n * (2 * d * dq + 2 * d * dkv) + 2 * n * n * dq + 3 * n * d * tc.intermediate_size
    return tc.num_hidden_layers * per_layer + d * tc.vocab_size


def prefill_flops(config, n_visual: int, n_text: int, n_tiles: int = 1) -> Dict[str, int]:
    """FLOPs of one prefill (time to first token) with n_visual visual tokens fed to the LLM."""
    dv, dt = config.vision_config.hidden_size, config.text_config.hidden_size
    parts = {"vision": vision_flops(config, n_tiles), "projector": n_visual * (dv * dt + dt * dt),
             "llm": llm_prefill_flops(config, n_visual + n_text)}
    parts["total"] = sum(parts.values())
    return parts


def kv_cache_bytes(config, n_tokens: int, bytes_per_element: int = 2) -> int:
    tc = config.text_config
    return 2 * tc.num_hidden_layers * n_tokens * _text_dims(tc)[2] * bytes_per_element
