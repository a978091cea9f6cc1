"""Compile the GPU path's Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, and read off
what the hardware would get: registers per thread, spill stores/loads, stack frame and shared memory.

    python benchmarks/triton_sm90.py                        # every kernel at the shipped tiles (table appended
                                                            # to benchmarks/results_triton_sm90.md)
    python benchmarks/triton_sm90.py --sweep 32,8,1 64,4,1    # backward tiles BE,T,warps ("T,warps": forward)
    python benchmarks/triton_sm90.py --kernels scan_fwd --no-write

Why: GPU time is short here, and a kernel that spills registers to local memory runs far from the memory
bandwidth it could reach, whatever its tiles. Triton compiles for a named target without a device (its own
compiler plus the ptxas it ships), so the launchers run unchanged on CPU tensors, with the launch replaced by a
compile (`sm90_compile_only`), and the bundled ptxas reports resources (`ptxas -v`).
The same shapes, dtypes and flags as ViM-S (batch 2, E 768, L 197, N 16, both directions, every fused
input) are compiled, and PlainMamba's four index-ordered directions; resources do not depend on the batch or L (the loops over chunks are not unrolled).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(__file__))

SM90_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on H100/H200
SM90_MAX_REGISTERS = 255


@dataclass
class Resources:
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    num_warps: int
    seconds: float
    inner_loop: int = 0  # SASS instructions of the scan's loop over states (see innermost_loop_instructions)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


class _Sm90Driver:
    """Just enough of a Triton driver to pick the sm_90 target; nothing is ever loaded or launched."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def sm90_compile_only():
    """Inside: every Triton launch compiles its kernel for sm_90 and returns without running; yields the list
    the compiled kernels are appended to (name, CompiledKernel, seconds)."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter runs kernels instead of compiling them")
    compiled: List[Tuple[str, object, float]] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel, time.perf_counter() - t0))
        return kernel

    JITFunction.run = compile_only
    driver.set_active(_Sm90Driver())
    try:
        yield compiled
    finally:
        JITFunction.run = run
        driver.set_active(None)  # the default driver is created again on next use (none without a GPU)


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_resources(name: str, kernel, seconds: float) -> Resources:
    """Registers, spills and stack from ``ptxas -v`` on the kernel's PTX; shared memory from Triton's metadata
    (the buffers it allocates itself, which ptxas does not see)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(kernel.asm["ptx"])
        log = subprocess.run([_tool("ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"ptxas -v output has no {pattern!r}:\n{log}")
        return int(m.group(1))
    return Resources(name, grab(r"Used (\d+) registers"), grab(r"(\d+) bytes spill stores"),
                     grab(r"(\d+) bytes spill loads"), grab(r"(\d+) bytes stack frame"),
                     int(kernel.metadata.shared), int(kernel.metadata.num_warps), seconds,
                     innermost_loop_instructions(kernel))


def innermost_loop_instructions(kernel) -> int:
    """SASS instructions of the smallest loop that contains no other loop and computes an exponential (a
    backward branch's span, from cuobjdump of the cubin): for the scan, the work of one state over one chunk in
    the steady state (a masked tail chunk, where a kernel has one, is a larger copy of the same loop)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    addrs, exps = [], []
    loops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if not m:
            continue
        here = int(m.group(1), 16)
        addrs.append(here)
        if "MUFU.EX2" in m.group(2):
            exps.append(here)
        if "BRA" in m.group(2):
            target = re.search(r"0x([0-9a-f]+)", m.group(2).split("BRA", 1)[1])
            if target and int(target.group(1), 16) < here:
                loops.append((int(target.group(1), 16), here))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)
             and any(a <= x <= b for x in exps)]
    return min((sum(a <= x <= b for x in addrs) for a, b in inner), default=0)


# ---- the launchers, on CPU tensors of ViM-S's shapes ------------------------------------------------------

def _scan_inputs(dtype, ndir=2, b=2, E=768, L=197, N=16, gap=False, idx=False, bc_dtype=torch.float32):
    # B and C in fp32 whatever u's dtype: fused_selective_scan converts them before the kernels (_fp32_rows)
    g = torch.Generator().manual_seed(0)

    def r(*s, dt=dtype):
        return torch.randn(*s, generator=g).to(dt)
    return dict(u=r(ndir, b, E, L), dt=r(ndir, b, E, L), A0=r(E, N, dt=torch.float32),
                A1=r(E, N, dt=torch.float32) if ndir == 2 else None, B=r(ndir, b, N, L, dt=bc_dtype),
                C=r(ndir, b, N, L, dt=bc_dtype),
                D0=r(E, dt=torch.float32), D1=r(E, dt=torch.float32) if ndir == 2 else None, z=r(b, E, L),
                bias0=r(E, dt=torch.float32), bias1=r(E, dt=torch.float32) if ndir == 2 else None,
                gap=r(ndir, b, L).abs() if gap else None,
                idx=torch.stack([torch.randperm(L, generator=g) for _ in range(ndir * b)]).view(ndir, b, L)
                if idx else None)


def launch_scan_fwd(dtype=torch.float32, ndir=2, gap=False, save=True, idx=False, bc_dtype=torch.float32):
    from tokenprune.ssm import fused_ops
    a = _scan_inputs(dtype, ndir, gap=gap, idx=idx, bc_dtype=bc_dtype)
    fused_ops.scan_fwd(*a.values(), True, True, save, 1.0 / ndir, dtype)


def launch_scan_bwd(dtype=torch.float32, ndir=2, gap=False, idx=False):
    from tokenprune.ssm import fused_ops, triton_scan
    a = _scan_inputs(dtype, ndir, gap=gap, idx=idx)
    u = a["u"]
    hchk = torch.zeros(ndir, u.shape[1], u.shape[2], triton_scan.num_chunks(u.shape[-1]), a["A0"].shape[1])
    fused_ops.scan_bwd(*a.values(), hchk, torch.randn(u.shape[1:]).to(dtype), True, True, 1.0 / ndir)


def launch_conv(dtype=torch.float32, backward=False):
    from tokenprune.ssm import fused_ops
    b, E, L, K = 2, 768, 197, 4
    x = torch.randn(b, E, L).to(dtype)
    w, bias = torch.randn(E, K), torch.randn(E)
    if backward:
        fused_ops.conv1d_silu_bwd(x, w, bias, w, bias, torch.randn(2, b, E, L).to(dtype))
    else:
        fused_ops.conv1d_silu_fwd(x, w, bias, w, bias)


def launch_norm(dtype=torch.float32, backward=False, D=384):
    from tokenprune.ssm import fused_norm
    h = torch.randn(2 * 197, D).to(dtype)
    w = torch.randn(D)
    if backward:
        res, rstd = torch.randn(2 * 197, D), torch.rand(2 * 197)
        fused_norm.add_rms_norm_bwd(h, res, res, w, rstd)
    else:
        fused_norm.add_rms_norm_fwd(h, torch.randn(2 * 197, D), w, 1e-5, dtype)


CASES: Dict[str, Callable[[], None]] = {
    "scan_fwd": lambda: launch_scan_fwd(),
    "scan_infer": lambda: launch_scan_fwd(save=False),  # inference: no states saved
    "scan_infer_4idx": lambda: launch_scan_fwd(ndir=4, gap=True, idx=True, save=False),
    "scan_infer_bf16": lambda: launch_scan_fwd(torch.bfloat16, save=False),
    # B and C in bf16 too, as the kernels took them before fused_selective_scan converted them (for comparison)
    "scan_infer_bf16bc": lambda: launch_scan_fwd(torch.bfloat16, save=False, bc_dtype=torch.bfloat16),
    "scan_fwd_gap": lambda: launch_scan_fwd(gap=True),
    "scan_fwd_bf16": lambda: launch_scan_fwd(torch.bfloat16),
    "scan_fwd_4idx": lambda: launch_scan_fwd(ndir=4, gap=True, idx=True),  # PlainMamba: 4 orders by index
    "scan_bwd": lambda: launch_scan_bwd(),
    "scan_bwd_gap": lambda: launch_scan_bwd(gap=True),
    "scan_bwd_bf16": lambda: launch_scan_bwd(torch.bfloat16),
    "scan_bwd_4idx": lambda: launch_scan_bwd(ndir=4, gap=True, idx=True),
    "conv_fwd": lambda: launch_conv(),
    "conv_bwd": lambda: launch_conv(backward=True),
    "norm_fwd": lambda: launch_norm(),
    "norm_bwd": lambda: launch_norm(backward=True),
}


def compile_case(case: str, tile: Optional[str] = None) -> List[str]:
    """Compile one case (a key of CASES) for sm_90, the scan at `tile` ("BE,T,warps") if given: table rows."""
    var = "TOKENPRUNE_SCAN_TILE" if case.startswith("scan_bwd") else "TOKENPRUNE_SCAN_FWD_TILE"
    saved = os.environ.get(var)
    if tile is not None:
        os.environ[var] = tile
    try:
        with sm90_compile_only() as compiled:
            CASES[case]()
        return [_row(ptxas_resources(f"{case}", k, s), case) for _, k, s in compiled]  # under the tile's env
    finally:
        if tile is not None:
            if saved is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = saved


def _scan_tile(case: str, L: int = 197):
    """(BE, T, warps) a scan case compiles with, and the (token, channel) pairs one thread handles per state."""
    from tokenprune.ssm import triton_scan
    if case.startswith("scan_bwd"):
        be, t, warps = triton_scan.tile_config(L)
    else:
        be, t, warps = triton_scan.fwd_tile_config(L, save=not case.startswith("scan_infer"))
    return (be, t, warps), be * t // (32 * warps)  # one lane per channel, the steps in registers


def _row(r: Resources, case: str) -> str:
    verdict = "spills" if r.spills else ("too much shared" if r.shared > SM90_SHARED_BYTES else "ok")
    tile, per_state = "-", "-"
    if case.startswith("scan"):
        (be, t, _), elems = _scan_tile(case)
        tile, per_state = f"{be},{t}", f"{r.inner_loop / elems:.1f}"
    return (f"| {r.kernel} | {tile} | {r.num_warps} | {r.registers} | {r.spill_stores:,} | {r.spill_loads:,} | "
            f"{r.stack:,} | {r.shared:,} | {verdict} | {per_state} | {r.seconds:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--sweep", nargs="*", default=None, metavar="BE,T,WARPS",
                    help="scan tiles to compile: the backward (scan_bwd*) takes 'BE,T,warps' "
                         "(TOKENPRUNE_SCAN_TILE), the forward 'T,warps' (TOKENPRUNE_SCAN_FWD_TILE)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results_triton_sm90.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from common import append_results, header
    cases = [c for c in args.kernels.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown kernels {unknown}; expected some of {list(CASES)}")
    tiles = args.sweep or [None]
    lines = ["| kernel case | scan tile BE,T | warps | registers | spill stores (B) | spill loads (B) | stack (B) "
             "| shared (B) | verdict | SASS instrs per (token, channel, state) | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for tile in tiles:
        for case in cases:
            if tile is not None and (not case.startswith("scan")
                                     or case.startswith("scan_bwd") != (tile.count(",") == 2)):
                continue
            for line in compile_case(case, tile):
                print(line, flush=True)
                lines.append(line)
    import triton
    text = (header("Triton kernels compiled for sm_90 (H100/H200) on CPU: resources from ptxas -v") +
            f"- triton {triton.__version__}, ptxas from triton's bundle; ViM-S shapes (E 768, N 16, L 197), "
            "fp32 unless the case says bf16, both directions, every fused input\n\n" + "\n".join(lines))
    print(text)
    if not args.no_write:
        append_results(args.out, text)


if __name__ == "__main__":
    main()
