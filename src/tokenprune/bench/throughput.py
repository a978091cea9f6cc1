"""Throughput measurement by the project's convention (stated below and in docs/CONVENTIONS.md, "Speed").

* eval mode, ``torch.inference_mode``, one synthetic input batch (fixed seed) at a fixed batch size;
* at least 10 warm-up and 30 timed iterations (fewer is allowed for smoke tests, but the result then says
  ``convention_ok: False`` and a warning is issued);
* GPU: CUDA events around the timed region with ``torch.cuda.synchronize`` before and after;
  CPU: wall clock (``time.perf_counter``);
* a speed-up is a ratio of two models measured *in the same run*: :func:`compare_throughput` interleaves the
  models in rounds (alternating the order every round) so drifts in clock speed or machine load hit all of
  them alike, and it reports the per-round ratios too;
* every result carries the device, dtype, batch, thread count and the torch / timm versions;
* GPU: each model's result also has the host time and the gap-free GPU time of one forward and their ratio
  (``host_over_gpu``; above 1 the model is launch-bound; :mod:`tokenprune.bench.host_time`).

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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .host_time import host_and_gpu_ms

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


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def _processor() -> str:
    """The processor as ``platform`` names it, else the architecture (``platform.processor()`` is often empty)."""
    return platform.processor() or platform.machine()


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else :func:`_processor`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _processor()


def machine_info(device: torch.device) -> Dict[str, Any]:
    """The machine a measurement ran on: CPU model, cores, torch threads, platform, python, torch / timm /
    tokenprune versions, the device and, on CUDA, the GPU name and CUDA version. The one source of machine facts
    for throughput results (:func:`environment`), the evaluation report and the VLM benchmark."""
    import tokenprune

    device = torch.device(device)
    cuda = device.type == "cuda"
    return {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": _version("timm"), "tokenprune": tokenprune.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "cuda": torch.version.cuda if cuda else None}


def environment(device: torch.device, dtype: torch.dtype, batch_size: int) -> dict:
    """Where and how a measurement ran (device name, dtype, batch, threads, versions): the throughput view of
    :func:`machine_info`; ``device_name`` is the GPU's name, or on CPU the processor as ``platform`` names it."""
    info = machine_info(device)
    return {
        "device": info["device"],
        "device_name": info["gpu"] if info["gpu"] is not None else _processor(),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": int(batch_size),
        "threads": info["torch_threads"],
        "cpu_count": info["cpu_cores"],
        "torch": info["torch"],
        "timm": info["timm"],
        "cuda": info["cuda"],
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


def _reference_name(models: Mapping[str, nn.Module], reference: Optional[str]) -> str:
    """The model the speed-ups are relative to: ``reference``, by default the first model."""
    if not models:
        raise ValueError("compare_throughput needs at least one model")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {names}")
    return reference


def _to_eval_mode(models: Mapping[str, nn.Module], device) -> Dict[str, bool]:
    """Put every model in eval mode (and on ``device`` when one is given); returns their training flags."""
    was_training = {n: m.training for n, m in models.items()}
    for m in models.values():
        if device is not None:
            m.to(device)
        m.eval()
    return was_training


def _progress_bar(verbose: bool, total: int):
    if not verbose:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="throughput", unit="it", leave=False)


def _warm_up(models: Mapping[str, nn.Module], names: List[str], x: torch.Tensor, warmup: int, dev: torch.device,
             peak: Dict[str, float], bar) -> None:
    """``warmup`` untimed forwards of every model; on CPU also the memory estimate (growth of the RSS peak)."""
    cuda = dev.type == "cuda"
    for n in names:
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


def _timed_rounds(models: Mapping[str, nn.Module], names: List[str], x: torch.Tensor, chunks: List[int],
                  dev: torch.device, times: Dict[str, List[float]], done: Dict[str, int], peak: Dict[str, float],
                  bar) -> None:
    """The timed forwards: round r runs ``chunks[r]`` iterations of every model, in alternating order
    (A B C, C B A, ...); per model the time of each round, the iterations done and, on GPU, the peak memory."""
    cuda = dev.type == "cuda"
    clock = _Clock(dev)
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


def _model_result(model: nn.Module, seconds: float, iters: int, batch_size: int, peak_mb: float, warmup: int,
                  convention_ok: bool, cuda: bool, env: dict, host_gpu: Optional[dict] = None) -> dict:
    """The result of one model (see :func:`measure_throughput`)."""
    host_gpu = host_gpu or {}
    return {
        "images_per_s": iters * batch_size / seconds,
        "ms_per_batch": 1000.0 * seconds / iters,
        "peak_mem_mb": peak_mb,
        "peak_mem_method": "cuda.max_memory_allocated" if cuda else "ru_maxrss_delta",
        "rss_peak_mb": None if cuda else _rss_peak_mb(),
        "iters": iters,
        "warmup": warmup,
        "convention_ok": convention_ok,
        "compile": getattr(model, "compile_mode", "none"),  # eager, torch.compile or CUDA-graph replay
        # GPU only (tokenprune.bench.host_time): host time and gap-free GPU time of one forward, and their ratio
        "host_ms_per_batch": host_gpu.get("host_ms"),
        "gpu_ms_per_batch": host_gpu.get("gpu_ms"),
        "host_over_gpu": host_gpu.get("host_over_gpu"),
        "host_gpu_gapless": host_gpu.get("gapless"),
        **env,
    }


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
    reference = _reference_name(models, reference)
    names = list(models)
    convention_ok = _check_counts(warmup, iters, batch_size)
    dt = as_dtype(dtype)
    dev = torch.device(device) if device is not None else _model_device(models[names[0]])
    cuda = dev.type == "cuda"
    env = environment(dev, dt, batch_size)
    was_training = _to_eval_mode(models, dev if device is not None else None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_size, generator=gen).to(dev)
    amp = (torch.autocast(dev.type, dtype=dt) if dt != torch.float32 else contextlib.nullcontext())
    chunks = _split(iters, rounds)
    times: Dict[str, List[float]] = {n: [] for n in names}
    peak: Dict[str, float] = {n: 0.0 for n in names}
    done: Dict[str, int] = {n: 0 for n in names}
    bar = _progress_bar(verbose, len(names) * (warmup + iters))
    host_gpu: Dict[str, dict] = {}
    try:
        with torch.inference_mode(), amp:
            _warm_up(models, names, x, warmup, dev, peak, bar)
            _timed_rounds(models, names, x, chunks, dev, times, done, peak, bar)
            if cuda:  # is any model launch-bound? (on a CPU the host does the work: nothing to compare)
                host_gpu = {n: host_and_gpu_ms(lambda m=models[n]: m(x), dev, repeats=3) for n in names}
    finally:
        if bar is not None:
            bar.close()
        for n, m in models.items():
            m.train(was_training[n])
    results = {n: _model_result(models[n], sum(times[n]), done[n], batch_size, peak[n], warmup, convention_ok,
                                cuda, env, host_gpu.get(n)) for n in names}
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
