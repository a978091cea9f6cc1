"""GPU selective scan in Triton, chunked: every input byte is read once, in tiles along the sequence.

Why our own: mamba-ssm has no bidirectional (ViM "v2") scan, no gap-aware decay for hidden-state alignment,
and ships prebuilt kernels for a few torch/CUDA pairs only; Triton comes with torch's CUDA wheels.

One program owns (batch row, block of BE channels) and walks the sequence in chunks of T tokens. A chunk's
u, Δ, z (BE, T) and B, C rows (T,) are loaded once, coalesced along L; for each state n the recurrence
h_t = exp(s_t·Δ_t·A_n)·h_{t-1} + Δ_t·B_{t,n}·u_t is a ``tl.associative_scan`` along the chunk, started from
the carried state. So time is proportional to L (no per-step latency chain, no per-step loads).

Fused in the kernel: Δ bias + softplus, A = -exp(A_log) (optional), the D skip, the SiLU(z) gate, the
per-token decay scale s_t = 1 + g_t of gap-aware alignment (decay only; the input term keeps Δ_t), and up to
two directions: direction 1 walks the sequence backwards *by index* (ViM's backward scan without flips) and
the program adds it to direction 0's output before the gate, out = silu(z)·(y_0 + y_1)/2 as in ViM.

Layout: every tensor is read through its strides, so the (E, batch, L) channel-major layout of the mixer
(plain 2-D matmuls, no transposes) and (batch, E, L) of ``selective_scan_fn`` both work without copies.
Inputs may be fp32, fp16 or bf16; states and accumulation are fp32; the output has the requested dtype.

Training: the forward stores the state at every backward-chunk start (NDIR, b, E, NCHUNK, N) in fp32; the
backward walks the chunks in reverse, recomputes the chunk's states from the stored one, and runs the reverse
recurrence dh_t = C_t·g_t + a_{t+1}·dh_{t+1} as a forward associative scan over the flipped chunk (a flip of
registers is free; reverse=True is lowered with lane shuffles). Gradients shared across
channels (B, C) and across the batch (A, D, bias) are written as per-program partials and summed in torch
(deterministic, no atomics).

Both kernels hold one channel per thread, the T steps of a chunk in its registers, so the associative scans
need no shuffles across lanes (see _scan_kernels); only the backward's channel sums for dB and dC cross lanes.

``TRITON_INTERPRET=1`` (set before the first use) runs the same kernels on CPU tensors; the tests use it.
"""
import os

import torch

def triton_available():
    """Triton importable, and either a GPU or the interpreter to run on."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or interpreting()


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"




# Compile options every launch of our kernels passes. FMA contraction stays on explicitly: Triton 3.9 warns that
# its default turns it off in 3.10, which splits the scan's multiply-adds (sm_90, TRITON_DEFAULT_FP_FUSION=0:
# forward 8.0 -> 10.0 SASS instructions per (token, channel, state), backward 30.2 -> 35.9). Passing the
# default value keeps Triton's cache key unchanged, so prewarmed caches still hit.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def kernels():
    """(scan_fwd, scan_bwd) Triton kernels, both with one channel per thread (the scans in registers)."""
    from . import _scan_kernels as k
    return k.scan_fwd, k.scan_bwd


# Backward tile (and the chunk length of the states a training forward saves): BE channels x T steps per
# program, warps; one lane per channel (BE / (32·warps) channels per thread), the T steps in its registers.
# Chosen without a GPU from what ptxas gives each tile for sm_90 (benchmarks/triton_sm90.py,
# benchmarks/results_triton_sm90.md): no register spills, the fewest instructions per (token, channel, state).
# One warp per program, so the channel sums of dB and dC need no exchange between warps. Not yet timed on a GPU:
# benchmarks/bench_ssm_gpu.py --sweep times others; TOKENPRUNE_SCAN_TILE="BE,T[,warps]" overrides (for sweeps).
DEFAULT_TILE = (32, 8, 1)


def _env_tile(var: str, counts, form: str, example: str):
    """The ints of environment variable `var` ("a,b[,c]"), or None when unset; each a power of two."""
    env = os.environ.get(var, "").strip()
    if not env:
        return None
    try:
        parts = [int(x) for x in env.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in counts or any(v < 1 or v & (v - 1) for v in parts):
        raise ValueError(f"{var}={env!r}: expected '{form}', powers of two, e.g. '{example}'")
    return parts


def tile_config(L):
    parts = _env_tile("TOKENPRUNE_SCAN_TILE", (2, 3), "BE,T[,warps]", "32,16,1")
    be, t, warps = DEFAULT_TILE if parts is None else (*parts, 1)[:3]
    if be % (32 * warps):
        raise ValueError(f"TOKENPRUNE_SCAN_TILE: BE={be} must be a multiple of 32·warps = {32 * warps} "
                         "(one lane per channel)")
    if t > 32:
        raise ValueError(f"TOKENPRUNE_SCAN_TILE: T={t} must be at most 32 (the dB/dC sums spread a chunk's "
                         "steps over a warp's lanes)")
    t = min(t, max(8, 1 << max(L - 1, 0).bit_length()))  # short sequences: no all-padding tiles
    return be, t, warps


# Forward tile: T steps per chunk in each thread's registers, `warps` warps, one channel per lane (BE = 32·warps);
# a training forward saves the state before every chunk of the backward (whose T divides the forward's). T = 32
# spills nothing on sm_90 at 2 warps; TOKENPRUNE_SCAN_FWD_TILE="T,warps" overrides.
FWD_TILE = (32, 2)


def fwd_tile_config(L, save=False):
    """(BE, T, warps) of the forward kernel for length L (T at least the backward's when saving states)."""
    t, warps = _env_tile("TOKENPRUNE_SCAN_FWD_TILE", (2,), "T,warps", "32,2") or FWD_TILE
    t = min(t, max(8, 1 << max(L - 1, 0).bit_length()))  # short sequences: no all-padding tiles
    if save:
        t = max(t, tile_config(L)[1])
    return 32 * warps, t, warps


def num_chunks(L):
    """Chunks of the scan for length L (the size of the saved states; the fake implementation uses it too)."""
    t = tile_config(L)[1]
    return -(-L // t)
