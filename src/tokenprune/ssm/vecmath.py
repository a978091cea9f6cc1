"""Branch-free float32 exp, log, softplus and SiLU that LLVM vectorises inside numba kernels.

numba has no SVML here, so np.exp / np.log in a kernel are scalar libm calls per element. These versions are
a few multiply-adds on the float bits: accurate to about 2 ulp over the range the scan uses, and vectorised by
LLVM (AVX2 or AVX-512). Every integer step is done in 32-bit ops by small intrinsics, because numba widens
int32 arithmetic to int64, and float <-> int64 conversion has no AVX2 instruction: a widened step turned the
whole loop scalar on AVX2-only CPUs. For float64 (used by gradcheck) the plain numpy functions run instead.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
# exp(x) = 2^k * exp(r), |r| <= ln2/2; ln2 split hi/lo for an exact k*ln2.
_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_XMIN = np.float32(-87.0)  # exp(-87) ~ 1.6e-38, still a normal float32
_XMAX = np.float32(88.0)
# Minimax polynomial for (exp(r) - 1 - r) / r^2 on |r| <= ln2/2 (~1 ulp).
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_SQRT2 = np.float32(1.4142135623730951)
# log(m) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = (m - 1) / (m + 1)
_A3, _A5, _A7, _A9 = (np.float32(1 / k) for k in (3, 5, 7, 9))
_TWO = np.float32(2.0)
_SOFTPLUS_THRESHOLD = np.float32(20.0)  # torch's: above it softplus(x) = x in float32
SILU_FLOOR = -_XMAX  # silu(x) for x below it is 0 to float32 precision


def _float32_bit_op(body):
    """A numba intrinsic float32 -> float32 whose LLVM code is ``body(builder, x, i32)``: 32-bit integer steps
    on the float's bits, which numba's own int32 arithmetic would widen to int64."""
    @intrinsic
    def op(typingctx, x):
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return body(builder, args[0], ir.IntType(32))
        return types.float32(types.float32), codegen
    return op


def _pow2_bits(builder, k, i32):
    # 2**k for an integral float32 k in the normal range [-126, 127] (the clamps of exp keep it there)
    biased = builder.add(builder.fptosi(k, i32), ir.Constant(i32, 127))
    return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())


def _exponent_bits(builder, x, i32):
    # the unbiased binary exponent of a positive normal float32, as a float32
    e = builder.sub(builder.lshr(builder.bitcast(x, i32), ir.Constant(i32, 23)), ir.Constant(i32, 127))
    return builder.sitofp(e, ir.FloatType())


def _mantissa_bits(builder, x, i32):
    # x / 2**exponent(x), in [1, 2), for a positive normal float32
    bits = builder.bitcast(x, i32)
    m = builder.or_(builder.and_(bits, ir.Constant(i32, 0x007FFFFF)), ir.Constant(i32, 0x3F800000))
    return builder.bitcast(m, ir.FloatType())


_pow2 = _float32_bit_op(_pow2_bits)
_exponent = _float32_bit_op(_exponent_bits)
_mantissa = _float32_bit_op(_mantissa_bits)


def vexp(x):  # pure-python stand-ins; the numba overloads below are what kernels run
    return np.exp(x)


def vlog(x):
    return np.log(x)


def vsoftplus(x):
    return np.log1p(np.exp(x)) if x <= _SOFTPLUS_THRESHOLD else x


def vsilu(x):
    return x / (1.0 + np.exp(-x))


@overload(vexp, inline="always")
def _vexp(x):
    if x == types.float32:
        def impl(x):
            x = min(max(x, _XMIN), _XMAX)
            k = np.floor(x * _LOG2E + _HALF)
            r = x - k * _LN2_HI
            r = r - k * _LN2_LO
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            p = p * r * r + r + _ONE
            return p * _pow2(k)
        return impl
    return lambda x: np.exp(x)


@overload(vlog, inline="always")
def _vlog(x):
    if x == types.float32:
        def impl(x):  # x positive and normal
            e = _exponent(x)
            m = _mantissa(x)
            big = np.float32(m > _SQRT2)  # halve m above sqrt(2): the series below converges fast on
            m = m * (_ONE - _HALF * big)    # [sqrt(2)/2, sqrt(2)); arithmetic, not a branch, to stay vectorised
            e = e + big
            s = (m - _ONE) / (m + _ONE)  # log m = 2 atanh(s), |s| <= 0.1716
            s2 = s * s
            p = (((_A9 * s2 + _A7) * s2 + _A5) * s2 + _A3) * s2 + _ONE
            return e * _LN2 + _TWO * s * p
        return impl
    return lambda x: np.log(x)


@overload(vsoftplus, inline="always")
def _vsoftplus(x):
    if x == types.float32:
        def impl(x):
            w = vexp(x)
            v = _ONE + w
            # log1p(w) = log(v) - ((v - 1) - w) / v corrects the rounding of 1 + w, so tiny w stay exact
            sp = vlog(v) - ((v - _ONE) - w) / v
            above = np.float32(x > _SOFTPLUS_THRESHOLD)
            # x above the threshold (exact: x - sp is exact there); max() keeps 0 * (x - sp) finite at x = -inf
            return sp + above * (max(x, _SOFTPLUS_THRESHOLD) - sp)
        return impl
    return lambda x: x if x > _SOFTPLUS_THRESHOLD else np.log1p(np.exp(x))


@overload(vsilu, inline="always")
def _vsilu(x):
    if x == types.float32:
        def impl(x):  # below -88 exp(-x) would clamp and x / exp(88) grow again: clamp x instead (~-5e-37)
            xc = max(x, SILU_FLOOR)
            return xc / (_ONE + vexp(-xc))
        return impl
    return lambda x: x / (1.0 + np.exp(-x))
