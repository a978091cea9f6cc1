"""Host time vs GPU time of one call (a forward): is a model launch-bound?

On a GPU a forward is two clocks. The host runs the Python and queues kernels (host time); the GPU runs them
(GPU time). When the host is slower, the GPU idles between kernels and the measured speed is the host's: a
pruned model that launches more small kernels can then be slower than the unpruned one although it computes
less. ``host ÷ GPU`` below 1 means the GPU sets the pace; issue 17 asks for <= 0.5 for every preset, so the
model stays GPU-bound with room to spare.

Why our own: torch.profiler gives the sum of kernel times, not the GPU's busy span per call, and costs far
more than the call itself; CUDA events around an ordinary call measure host gaps as GPU time.

How (per repeat, medians over repeats):
* host: ``perf_counter`` around the call after a synchronize (the queue is empty, so queuing never blocks);
* GPU: the stream is first kept busy with a spin kernel (``compat.cuda_spin``) for longer than the host
  needs, so every kernel of the call is queued before the first one starts, and CUDA events around the call
  then time the kernels back to back, without host gaps. The start event still pending after the call
  returned proves it (``gapless``); otherwise the spin is doubled and the repeat retried (a host
  synchronisation inside the call, or a full launch queue, keeps it from ever being gapless: then the GPU
  time includes gaps and ``gapless`` is False).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional, Union

import torch

from ..compat import cuda_spin

_SPIN_CALIBRATION_CYCLES = 10_000_000


def _cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles per millisecond of the spin kernel (measured: the clock varies by part)."""
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    t0.record()
    cuda_spin(_SPIN_CALIBRATION_CYCLES)
    t1.record()
    torch.cuda.synchronize(device)
    return _SPIN_CALIBRATION_CYCLES / max(t0.elapsed_time(t1), 1e-3)


def host_ms(fn: Callable[[], object], repeats: int = 5, sync: Optional[Callable[[], None]] = None) -> float:
    """Median milliseconds the host spends in ``fn()`` (after ``sync()``, so nothing queued blocks it)."""
    out = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t = time.perf_counter()
        fn()
        out.append(1000.0 * (time.perf_counter() - t))
    return statistics.median(out)


def host_and_gpu_ms(fn: Callable[[], object], device: Union[str, torch.device, None] = None, repeats: int = 5,
                    max_retries: int = 4) -> Dict[str, object]:
    """``{"host_ms", "gpu_ms", "host_over_gpu", "gapless"}`` of ``fn()`` (medians over ``repeats``); on a CPU
    device ``gpu_ms`` and the ratio are None (the host does the work). See the module docstring."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    if dev.type != "cuda":
        return {"host_ms": host_ms(fn, repeats), "gpu_ms": None, "host_over_gpu": None, "gapless": None}
    sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    host = host_ms(fn, repeats, sync)
    per_ms = _cycles_per_ms(dev)
    gpu, gapless = [], True
    for _ in range(repeats):
        sleep_ms = 2.0 * host + 1.0
        for attempt in range(max_retries + 1):
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            sync()
            cuda_spin(sleep_ms * per_ms)
            t0.record()
            fn()
            t1.record()
            ahead = not t0.query()  # the GPU had not reached the call when the host finished queuing it
            sync()
            if ahead or attempt == max_retries:
                gapless = gapless and ahead
                gpu.append(t0.elapsed_time(t1))
                break
            sleep_ms *= 2
    g = statistics.median(gpu)
    return {"host_ms": host, "gpu_ms": g, "host_over_gpu": host / g if g > 0 else None, "gapless": gapless}
