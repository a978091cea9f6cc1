"""Depthwise conv1d + bias + SiLU in Triton, causal and anti-causal in one launch (ViM's two directions).

Why: ``F.conv1d`` with groups=E runs as ``conv_depthwise2d`` on CUDA behind padding copies, and ViM's backward
direction needs a flipped copy of x. Here direction 0 is causal (taps x[t-K+1..t], Mamba's conv) and
direction 1 anti-causal (taps x[t+K-1..t] in the same weight order), which is exactly the causal conv of the
flipped sequence read back in token order: no flips, no padding.

Each program owns (batch row, BE channels, T steps); the K shifted tiles of x hit the L1 cache. The backward
recomputes the pre-activation at the K shifted positions it needs (no stored activations) and writes the
weight/bias gradients as per-program partials that torch sums (deterministic).
x is read through its strides (unit stride along L), so (b, E, L) and (E, b, L) layouts need no copies.
"""


def kernels():
    """(conv_fwd, conv_bwd) Triton kernels."""
    from . import _conv_kernels as k
    return k.conv_fwd, k.conv_bwd


CONV_TILE = (16, 64)  # BE channels x T steps per program; larger tiles spill registers on sm_90 (triton_sm90.py)
