"""Prefill benchmark of a LLaVA model at several visual-token budgets: tokens, FLOPs, time, KV cache.

Everything is a ratio against the unreduced budget measured in the same run (docs/CONVENTIONS.md, "Speed").
Time to first token = vision tower + reduction + projector + LLM prefill with the logits of the last token;
the LLM prefill alone is timed too. KV-cache bytes are read from the returned cache. aten ops per time to
first token (counted with a dispatch mode) tell how much of a small-token prefill is launch overhead on a GPU.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from transformers import LlavaForConditionalGeneration

from ..bench.dispatch import OpCounter
from ..compat import hf_model_from_config
from .attach import attach
from .configs import llava15_config
from .cost import kv_cache_bytes, prefill_flops

BUDGETS = (576, 192, 128, 64)


def build_model(real: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                text_layers: Optional[int] = None, vision_layers: Optional[int] = None, seed: int = 0,
                skip_init: Optional[bool] = None):
    """A random LLaVA-1.5 (7B shapes when real) built directly on `device` in `dtype`.

    skip_init (default: real) skips transformers' weight init (a 7B init on the CPU alone takes minutes) and
    fills the parameters with N(0, 0.02) on the device; the values do not change the time.
    """
    cfg = llava15_config(real=real, vision_layers=vision_layers, text_layers=text_layers)
    torch.manual_seed(seed)
    if not (real if skip_init is None else skip_init):
        return LlavaForConditionalGeneration(cfg).to(device=device, dtype=dtype).eval()
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = hf_model_from_config(LlavaForConditionalGeneration, cfg, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def prompt_inputs(model, n_text: int = 32, device: str = "cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """One image and an n_text-token prompt (BOS, text, the 576 placeholders after the 4th token, text)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, cfg.image_token_id)
    text = torch.randint(3, vocab, (n_text,), generator=g)
    text[0] = 1
    vc = cfg.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    ids = torch.cat([text[:4], torch.full((n_img,), cfg.image_token_id), text[4:]])[None]
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
    return dict(input_ids=ids.to(device), pixel_values=pixels.to(device, model.dtype),
                attention_mask=torch.ones_like(ids).to(device))


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _cache_bytes(cache) -> Optional[int]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def count_ops(fn) -> int:
    """aten ops one call runs (a device-free proxy for kernel launches, docs/CONVENTIONS.md)."""
    with OpCounter() as counter:
        fn()
    return counter.total


def _once(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def measure(model, budgets: Sequence[int] = BUDGETS, method: str = "visionzip", n_text: int = 32,
            warmup: int = 2, iters: int = 5) -> List[dict]:
    """One row per budget: visual tokens, FLOPs, TTFT, LLM prefill time, KV cache, peak memory (CUDA).

    The budgets are timed interleaved (one run of each per round), so a load change on a shared machine hits
    all of them alike; each time is the median over the rounds.
    """
    device = str(next(model.parameters()).device)
    cuda = device.startswith("cuda")
    inputs = prompt_inputs(model, n_text, device)
    elem = next(model.parameters()).element_size()
    rows, runs = [], []
    for budget in budgets:
        reduced = attach(model, method, budget)
        prepared = reduced.prepare(**inputs)
        n_vis = int((prepared["input_ids"] == model.config.image_token_id).sum())
        llm = lambda p=prepared: model(**p, use_cache=True, logits_to_keep=1)  # noqa: E731
        ttft = lambda r=reduced: model(**r.prepare(**inputs), use_cache=True, logits_to_keep=1)  # noqa: E731
        peak = None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = ttft()
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
        kv = _cache_bytes(out.past_key_values)
        del out
        ops = count_ops(ttft)
        fl = prefill_flops(model.config, n_vis, n_text)
        analytic = kv_cache_bytes(model.config, n_vis + n_text, elem)
        rows.append(dict(budget=budget, visual_tokens=n_vis, seq_len=n_vis + n_text, flops=fl["total"],
                         llm_flops=fl["llm"], kv_bytes=analytic if kv is None else kv, kv_bytes_analytic=analytic,
                         peak_bytes=peak, aten_ops=ops))
        runs.append((ttft, llm))
    for _ in range(warmup):
        for ttft, llm in runs:
            ttft(), llm()
    times = [([], []) for _ in runs]
    for _ in range(iters):
        for (ttft, llm), (t_first, t_llm) in zip(runs, times):
            t_first.append(_once(ttft, device))
            t_llm.append(_once(llm, device))
    for row, (t_first, t_llm) in zip(rows, times):
        row["ttft_s"], row["llm_prefill_s"] = statistics.median(t_first), statistics.median(t_llm)
    return rows


def markdown_table(rows: List[dict]) -> str:
    base = rows[0]
    head = ("| budget | visual tokens | LLM sequence | prefill GFLOPs | FLOPs ratio | TTFT ms | TTFT ratio "
            "| LLM prefill ms | LLM prefill ratio | KV cache MiB | KV ratio | prefill peak MiB | aten ops |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {r['budget']} | {r['visual_tokens']} | {r['seq_len']} | {r['flops'] / 1e9:.2f} "
            f"| {r['flops'] / base['flops']:.3f} | {r['ttft_s'] * 1e3:.2f} | {r['ttft_s'] / base['ttft_s']:.3f} "
            f"| {r['llm_prefill_s'] * 1e3:.2f} | {r['llm_prefill_s'] / base['llm_prefill_s']:.3f} "
            f"| {r['kv_bytes'] / 2**20:.2f} | {r['kv_bytes'] / base['kv_bytes']:.3f} | {peak} | {r['aten_ops']} |")
    return "\n".join(lines)


def environment(model) -> str:
    """One line naming where the benchmark ran (machine facts from tokenprune.bench.throughput.machine_info)."""
    p = next(model.parameters())
    import transformers

    from ..bench.throughput import machine_info

    info = machine_info(p.device)
    dev = info["gpu"] if info["gpu"] is not None else info["cpu"]
    return (f"device {info['device']} ({dev}), dtype {p.dtype}, torch {info['torch']}, transformers "
            f"{transformers.__version__}, threads {info['torch_threads']}")


