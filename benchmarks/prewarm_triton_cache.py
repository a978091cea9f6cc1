"""Compile the GPU suite's Triton kernels for sm_90 on this CPU machine, into a cache the suite unpacks before it
runs, so a short GPU lease does not spend minutes compiling (2026-12-06, 2 cores: the kernel-parity stage's 58
kernels took ~220 s to build with Triton 3.6.0, most of it the scan's forward and backward):

    PYTHONPATH=src <python> benchmarks/prewarm_triton_cache.py .whl

Run it with the Python, torch and Triton the GPU machine has (3.12, 2.11.0, 3.6.0; scripts/prepare_gpu_wheels.sh
makes such a venv): Triton finds a cached kernel by a key of its own version and files (its libtriton differs per
Python version), the bundled ptxas's version, the target, the kernel's source and its specialisation (dtypes,
constexprs, which integers and pointers are divisible by 16), so the launches here are the ones the GPU makes,
with the same shapes, on CPU tensors, each only compiled (triton_sm90.sm90_compile_only):
tests/scripts/fused_check.py's GPU cases and tile checks, and bench_ssm_gpu.py's scan, length and tile-sweep
tables (the model tables need real matmuls and compile on the GPU). Unpacked into a fresh cache here, the
parity kernels were all found again (a second run compiled nothing); a kernel that misses the cache is compiled
as usual. Writes OUTDIR/triton_cache-<version>.tar.xz."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "scripts"))


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else ".whl"
    cache = tempfile.mkdtemp(prefix="triton_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache  # read by Triton when it first needs the cache
    import triton

    import bench_ssm_gpu as ssm  # noqa: E402
    import fused_check  # noqa: E402  (tests/scripts)
    import triton_sm90  # noqa: E402
    t0 = time.time()
    runs = [["--device", "cpu", "--cases", "gpu"], ["--device", "cpu", "--tiles", *ssm.SWEEP_BWD_TILES]]
    with triton_sm90.sm90_compile_only() as compiled:
        for args in runs:
            sys.argv = ["fused_check.py", *args]
            # nothing runs, so the script's comparisons fail: only its launches matter here
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                fused_check.main()
        # the SSM benchmark's scan tables at their real shapes (ViM-S, batch 128 and 64, the tile sweep): each
        # timed callable called once; the model tables need real matmuls and are left to the GPU
        def call_once(fns, **_):
            for fn in fns.values():
                with contextlib.suppress(RuntimeError):  # the public op refuses CPU tensors without the interpreter
                    fn()
            return dict.fromkeys(fns, 1.0)
        ssm.DEV, ssm.bench, ssm.copy_time = "cpu", call_once, lambda nbytes: 1.0
        for section in (ssm.section_scan, ssm.section_length, ssm.section_sweep):
            section([])
    print(f"{len(compiled)} launches, {len(os.listdir(cache))} kernels compiled for sm_90 with Triton {triton.__version__} "
          f"in {time.time() - t0:.0f} s", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"triton_cache-{triton.__version__}.tar.xz")
    with tarfile.open(path, "w:xz") as tar:
        tar.add(cache, arcname="triton_cache")
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
