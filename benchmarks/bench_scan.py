"""Selective-scan speed: fast impl vs the plain per-step PyTorch loop, same run.

    python benchmarks/bench_scan.py                 # CPU: "cpu" vs "reference"
    python benchmarks/bench_scan.py --impl triton --device cuda   # GPU machines (--impl cuda: mamba-ssm)

Forward is timed under no_grad (inference); fwd+bwd is forward with grad plus
backward of a fixed random output gradient. The impls are timed interleaved,
round by round, after a warm-up, and the median of the rounds is reported, so
a noisy (shared) machine affects both sides of each ratio alike. First-call
JIT cost of the numba kernels is measured in fresh subprocesses (cold cache,
then warm cache).
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from tokenprune.ssm import scan_impl_report, selective_scan

SHAPES = {"vim_t": (8, 384, 16, 197), "long": (1, 384, 16, 1024), "vim_s": (8, 768, 16, 197)}


def make_inputs(batch, E, N, L, device):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xs = dict(u=r(batch, E, L), delta=r(batch, E, L), A=-torch.exp(r(E, N)), B=r(batch, N, L),
              C=r(batch, N, L), D=r(E), z=r(batch, E, L), delta_bias=r(E))
    return {k: v.to(device) for k, v in xs.items()}, r(batch, E, L).to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def bench_shape(shape, impls, device, repeats, warmup_s):
    xs, gout = make_inputs(*shape, device)
    leaves = {k: v.clone().requires_grad_() for k, v in xs.items()}

    def fwd(impl):
        with torch.no_grad():
            selective_scan(**xs, delta_softplus=True, impl=impl)

    def fwd_bwd(impl):
        for v in leaves.values():
            v.grad = None
        selective_scan(**leaves, delta_softplus=True, impl=impl).backward(gout)

    jobs = [(impl, kind, fn) for impl in impls for kind, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd))]
    t0 = time.perf_counter()
    while True:  # warm-up (JIT, allocator, CPU clocks); at least one call each
        for impl, _, fn in jobs:
            fn(impl)
        if time.perf_counter() - t0 > warmup_s:
            break
    times = {(impl, kind): [] for impl, kind, _ in jobs}
    for _ in range(repeats):
        for impl, kind, fn in jobs:
            times[(impl, kind)].append(timed(lambda: fn(impl), device))  # noqa: B023
    return {key: 1e3 * statistics.median(v) for key, v in times.items()}


_FIRST_CALL = r"""
import time, torch
from tokenprune.ssm import selective_scan
x = torch.randn(2, 4, 8, requires_grad=True); A = -torch.rand(4, 3); B = torch.randn(2, 3, 8)
t = time.perf_counter()
selective_scan(x, x, A, B, B, torch.ones(4), z=x, delta_bias=torch.zeros(4), delta_softplus=True,
               impl="cpu").sum().backward()
print(time.perf_counter() - t)
"""


def first_call_seconds():
    """(cold-cache compile, warm-cache load) seconds of the first cpu fwd+bwd call."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = lambda: float(subprocess.run(  # noqa: E731
            [sys.executable, "-c", _FIRST_CALL], env=env, check=True, capture_output=True,
            text=True).stdout.split()[-1])
        return run(), run()


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["vim_t", "long"], choices=sorted(SHAPES))
    p.add_argument("--impl", default="cpu", help="fast impl to compare with the reference loop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--no-compile-time", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"# bench_scan  {datetime.datetime.now().isoformat(timespec='seconds')}")
    gpu = f" ({torch.cuda.get_device_name(args.device)}, CUDA {torch.version.cuda})" if args.device.startswith("cuda") else ""
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"threads {torch.get_num_threads()}; device {args.device}{gpu}")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    impls = ["reference", args.impl]
    print(f"\n| shape (b, E, N, L) | impl | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.shapes:
        shape = SHAPES[name]
        res = bench_shape(shape, impls, args.device, args.repeats, args.warmup_s)
        ref_f, ref_b = res[("reference", "fwd")], res[("reference", "fwd_bwd")]
        for impl in impls:
            f, b = res[(impl, "fwd")], res[(impl, "fwd_bwd")]
            print(f"| {name} {shape} | {impl} | {f:.1f} | {b:.1f} | {ref_f / f:.1f}x | {ref_b / b:.1f}x |")
    rep = scan_impl_report()
    print(f"\n# scan_impl_report: last={rep['last']} counts={rep['counts']}"
          + (f" numba_threading_layer={rep['numba_threading_layer']}"
             if "numba_threading_layer" in rep else ""))
    if args.impl == "cpu" and not args.no_compile_time:
        cold, warm = first_call_seconds()
        print(f"# first cpu call (fwd+bwd, tiny): {cold:.2f} s with an empty numba cache "
              f"(JIT compile), {warm:.2f} s with the cache filled")


if __name__ == "__main__":
    main()
