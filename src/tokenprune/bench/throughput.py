"""Throughput measurement by the project's convention (DESIGN.md §5).

* eval mode, ``torch.inference_mode``, one synthetic input batch (fixed seed) at a fixed batch size;
* at least 10 warm-up and 30 timed iterations (fewer is allowed for smoke tests, but the result then says
  ``convention_ok: False`` and a warning is issued);
* GPU: CUDA events around the timed region with ``torch.cuda.synchronize`` before and after;
  CPU: wall clock (``time.perf_counter``);
* a speed-up is a ratio of two models measured *in the same run*: :func:`compare_throughput` interleaves the
  models in rounds (alternating the order every round) so drifts in clock speed or machine load hit all of
  them alike, and it reports the per-round ratios too;
* every result carries the device, dtype, batch, thread count and the torch / timm versions.

Peak memory
    GPU: ``torch.cuda.max_memory_allocated`` over the model's timed iterations (weights + activations of
    the tensors PyTorch allocated; the caching allocator's reserve is not counted), in MiB.
    CPU: there is no allocator counter for CPU tensors, so ``peak_mem_mb`` is the growth of the process's
    high-water resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) during the model's first
    warm-up iterations. It is an approximation: a lower bound that is 0 when an earlier allocation in the
    process (another model, a bigger batch) was already larger; ``rss_peak_mb`` gives the process's absolute
    high-water mark. For exact CPU numbers measure each model in a fresh process.

``dtype`` other than float32 runs the forward under ``torch.autocast(device_type, dtype)`` (mixed precision,
the weights stay in float32 as in bf16-mixed training); the selective scan computes in float32 regardless.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import time
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

MIN_WARMUP = 10
MIN_ITERS = 30

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}


def as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """torch dtype from a dtype or a name (float32, bfloat16/bf16, float16/fp16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _rss_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def environment(device: torch.device, dtype: torch.dtype, batch_size: int) -> dict:
    """Where and how a measurement ran (device name, dtype, batch, threads, versions)."""
    try:
        import timm
        timm_version = timm.__version__
    except Exception:  # noqa: BLE001
        timm_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": int(batch_size),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


class _Clock:
    """Times a block of iterations: CUDA events (+ synchronize) on GPU, perf_counter on CPU; seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t1 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._c0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._t1.record()
            torch.cuda.synchronize(self.device)
            return self._t0.elapsed_time(self._t1) / 1000.0
        return time.perf_counter() - self._c0


def _split(total: int, parts: int) -> List[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _check_counts(warmup: int, iters: int, batch_size: int) -> bool:
    if iters < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need iters >= 1, warmup >= 0 and batch_size >= 1, got {iters}, {warmup}, {batch_size}")
    ok = warmup >= MIN_WARMUP and iters >= MIN_ITERS
    if not ok:
        warnings.warn(f"throughput with {warmup} warm-up / {iters} timed iterations is below the project's "
                      f"convention (>= {MIN_WARMUP} / >= {MIN_ITERS}); use it for smoke tests only")
    return ok


def compare_throughput(models: Mapping[str, nn.Module], input_size: Sequence[int] = (3, 224, 224),
                       batch_size: int = 64, warmup: int = 10, iters: int = 30, device=None,
                       dtype: Union[str, torch.dtype] = torch.float32, reference: Optional[str] = None,
                       rounds: int = 5, verbose: bool = False, seed: int = 0) -> dict:
    """Measure several models in the same run, interleaved, and give speed-ups against ``reference``.

    Every model gets ``warmup`` untimed forwards, then ``iters`` timed forwards split into ``rounds`` blocks;
    the blocks of the models alternate (A B C, C B A, A B C, ...). Returns::

        {"reference": name, "models": {name: result as measure_throughput}, "speedup": {name: ips / ips_ref},
         "speedup_rounds": {name: [per-round ratios]}, **environment}

    Models are put in eval mode (and moved to ``device`` when one is given; default: the first model's
    device) and their training flag is restored afterwards.
    """
    if not models:
        raise ValueError("compare_throughput needs at least one model")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {names}")
    convention_ok = _check_counts(warmup, iters, batch_size)
    dt = as_dtype(dtype)
    dev = torch.device(device) if device is not None else _model_device(models[names[0]])
    cuda = dev.type == "cuda"
    env = environment(dev, dt, batch_size)
    was_training = {n: m.training for n, m in models.items()}
    for m in models.values():
        if device is not None:
            m.to(dev)
        m.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_size, generator=gen).to(dev)
    amp = (torch.autocast(dev.type, dtype=dt) if dt != torch.float32 else contextlib.nullcontext())
    clock = _Clock(dev)
    chunks = _split(iters, rounds)
    times: Dict[str, List[float]] = {n: [] for n in names}
    peak: Dict[str, float] = {n: 0.0 for n in names}
    done: Dict[str, int] = {n: 0 for n in names}
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(names) * (warmup + iters), desc="throughput", unit="it", leave=False)
    try:
        with torch.inference_mode(), amp:
            for n in names:  # warm-up; on CPU also the memory estimate
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                rss0 = _rss_peak_mb()
                for _ in range(warmup):
                    models[n](x)
                    if bar is not None:
                        bar.update(1)
                if cuda:
                    torch.cuda.synchronize(dev)
                else:
                    peak[n] = max(0.0, _rss_peak_mb() - rss0)
            for r, k in enumerate(chunks):
                order = names if r % 2 == 0 else names[::-1]
                for n in order:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(dev)
                    clock.start()
                    for _ in range(k):
                        models[n](x)
                    times[n].append(clock.stop())
                    done[n] += k
                    if cuda:
                        peak[n] = max(peak[n], torch.cuda.max_memory_allocated(dev) / 2**20)
                    if bar is not None:
                        bar.update(k)
    finally:
        if bar is not None:
            bar.close()
        for n, m in models.items():
            m.train(was_training[n])
    results = {}
    for n in names:
        total = sum(times[n])
        results[n] = {
            "images_per_s": done[n] * batch_size / total,
            "ms_per_batch": 1000.0 * total / done[n],
            "peak_mem_mb": peak[n],
            "peak_mem_method": "cuda.max_memory_allocated" if cuda else "ru_maxrss_delta",
            "rss_peak_mb": None if cuda else _rss_peak_mb(),
            "iters": done[n],
            "warmup": warmup,
            "convention_ok": convention_ok,
            "compile": getattr(models[n], "compile_mode", "none"),  # eager, torch.compile or CUDA-graph replay
            **env,
        }
    ref_rounds = times[reference]
    speedup = {n: results[n]["images_per_s"] / results[reference]["images_per_s"] for n in names}
    # per round: the same number of iterations of each model, so the time ratio is the speed ratio
    speedup_rounds = {n: [tr / tn for tr, tn in zip(ref_rounds, times[n])] for n in names}
    return {"reference": reference, "models": results, "speedup": speedup, "speedup_rounds": speedup_rounds,
            "rounds": len(chunks), "iters": iters, "warmup": warmup, **env}


def measure_throughput(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 64,
                       warmup: int = 10, iters: int = 30, device=None,
                       dtype: Union[str, torch.dtype] = torch.float32, verbose: bool = False, seed: int = 0) -> dict:
    """images/s, ms per batch and peak memory of one model (keys: images_per_s, ms_per_batch, peak_mem_mb,
    device, dtype, batch, torch, timm, ...). See the module docstring for the method."""
    out = compare_throughput({"model": model}, input_size, batch_size, warmup, iters, device, dtype,
                             rounds=1, verbose=verbose, seed=seed)
    return out["models"]["model"]
