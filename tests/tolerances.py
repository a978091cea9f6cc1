"""Tolerances for comparing two float32 computations of the same values that take different code paths.

Use only where the two sides really differ in their arithmetic: another kernel or operation order (a fast path
against a reference loop, batched against one image at a time, compiled against eager, SDPA against explicit
attention, two separately built copies of one network). Where the code path is the same (keep=1.0, a copy, a
replay of the same ops, indices, counts), compare exactly; for float64 references keep the float64 tolerances.
"""
import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23 ~ 1.19e-7: the spacing of float32 numbers at 1.0
C = 16.0  # safety factor, see fp32_tol


def fp32_tol(expected: torch.Tensor, terms: int, c: float = C) -> dict:
    """``rtol``/``atol`` for ``torch.testing.assert_close(actual, expected, **fp32_tol(expected, terms))``::

        rtol = c * eps32 * sqrt(terms)
        atol = rtol * max|expected|

    Why not a fixed atol such as 1e-6: two float32 computations of one quantity in different orders are not
    equal to the last bit, and how far apart they are depends on the machine (SIMD width, BLAS/oneDNN kernel
    and blocking, thread split: AVX-512, AVX2 and SSE builds sum in different orders). A fixed absolute number
    passes where it was written and fails elsewhere (issue 21: 1.03e-6 against atol=1e-6 on a 2-core AMD EPYC,
    at an element of size 9e-4 of a tensor whose largest entry is 29).

    The model: a sum of n float32 terms of size S carries a rounding error of about eps32 * sqrt(n) * S (rounding
    errors add like a random walk: Higham & Mary, SIAM J. Sci. Comput. 2019; eps32 * n * S is the worst case).

    ``expected``: the reference side (either side will do: only its largest finite magnitude is used).
    ``terms``: the length of the longest reduction or recurrence that feeds one output element -- the channels
        of a matmul, the keys of an attention row, the steps of a scan -- times the number of layers it passes
        through (the errors of successive layers add up the same way). An order of magnitude is enough: the
        tolerance goes with its square root.
    ``atol`` is taken from the tensor's scale, not the element's: an element that is small because its terms
        cancelled (9e-4 above) still carries the absolute error of those terms, which are of the tensor's size.
    ``c`` = 16 covers the two sides both being off (x2), a bound that holds with high probability rather than on
        average (x~3), and terms a few times larger than the result they sum to (logits of a small head, x~3).
        Measured at the sites that use it, with AVX-512, AVX2 and SSE kernels (ATEN_CPU_CAPABILITY,
        MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, NUMBA_CPU_NAME) and with one and two threads, the differences
        are at most 1.4 x eps32 * sqrt(terms) * max|expected| (the logits of a 4-block model) and mostly < 0.2 x,
        so c leaves a margin of >= 11 for other CPUs.

    It still catches real bugs: a wrong index, a missing term or a wrong scale moves elements by a sizable
    fraction of the values' scale (>= 1e-3 of it), while rtol stays below 1e-4 up to terms ~ 2700.
    """
    rtol = c * EPS32 * math.sqrt(terms)
    expected = torch.as_tensor(expected).detach()
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return {"rtol": rtol, "atol": rtol * scale}
