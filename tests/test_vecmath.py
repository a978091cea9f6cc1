"""The vectorisable float32 math of the CPU scan kernel (tokenprune.ssm.vecmath) against float64 numpy."""
import numpy as np
import pytest

numba = pytest.importorskip("numba")
from tokenprune.ssm.vecmath import vexp, vlog, vsilu, vsoftplus  # noqa: E402


def _elementwise(fn):
    @numba.njit(fastmath={"reassoc", "contract"})
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])
    return lambda x: (apply(x, out := np.empty_like(x)), out)[1]


def _rel_err(got, want, floor=0.0):
    return float(np.max(np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), floor)))


GRID = np.linspace(-87.0, 88.0, 200_001).astype(np.float32)


def test_exp_is_accurate_over_the_range_it_is_used_in():
    got = _elementwise(vexp)(GRID)
    assert _rel_err(got, np.exp(GRID.astype(np.float64))) < 3e-7  # ~2 ulp
    clamped = _elementwise(vexp)(np.array([-1e4, -100.0, 100.0, 1e4], np.float32))
    assert np.all(np.isfinite(clamped)) and clamped[0] == clamped[1] > 0 and clamped[2] == clamped[3]


def test_log_is_accurate_for_positive_normal_floats():
    x = np.exp(np.linspace(-80.0, 80.0, 200_001)).astype(np.float32)
    x = np.concatenate([x, np.float32([1.0, 2.0, np.sqrt(2.0), np.nextafter(np.float32(np.sqrt(2.0)), 2.0)])])
    got = _elementwise(vlog)(x)
    assert np.max(np.abs(got - np.log(x.astype(np.float64)))) < 2e-7 * 80  # relative to |log x| <= 80
    assert got[-4] == 0.0 and abs(got[-3] - np.log(2.0)) < 1e-7


def test_softplus_matches_torchs_definition():
    """log1p(exp(x)), and x above 20 exactly as torch; tiny values keep their relative accuracy down to
    x = -87, below which exp clamps: softplus stays at exp(-87) ~ 1.6e-38 instead of going subnormal."""
    x = np.concatenate([GRID, np.float32([-30.0, -1e-3, 0.0, 19.99, 20.0, 20.01, 50.0, 1e6])])
    with np.errstate(over="ignore"):
        want = np.where(x > 20, x.astype(np.float64), np.log1p(np.exp(x.astype(np.float64))))
    got = _elementwise(vsoftplus)(x)
    assert _rel_err(got, want) < 5e-7
    assert np.array_equal(got[x > 20], x[x > 20])
    far = _elementwise(vsoftplus)(np.float32([-100.0, -1e30, -np.inf, np.inf]))
    assert np.all((far[:3] > 0) & (far[:3] <= 1.7e-38)) and far[3] == np.inf  # no NaN from 0 * inf


def test_silu():
    """x sigmoid(x); below -88 (where exp(-x) would clamp and x / exp(88) grow with |x|) it is ~-5e-37."""
    x = np.concatenate([GRID, np.float32([0.0, 100.0, 1e4])])
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want = x64 / (1.0 + np.exp(-x64))
    got = _elementwise(vsilu)(x)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - want) <= 5e-7 * np.abs(want) + 1e-30)
    far = _elementwise(vsilu)(np.float32([-100.0, -1e4, -1e38, -np.inf, np.inf]))
    assert np.all(np.abs(far[:4]) < 1e-36) and far[4] == np.inf


def test_float64_falls_back_to_numpy():
    x = np.linspace(-30.0, 30.0, 101)
    np.testing.assert_allclose(_elementwise(vexp)(x), np.exp(x), rtol=1e-15)
    np.testing.assert_allclose(_elementwise(vsoftplus)(x), np.where(x > 20, x, np.log1p(np.exp(x))), rtol=1e-15)
    np.testing.assert_allclose(_elementwise(vlog)(np.exp(x)), x, rtol=1e-14, atol=1e-14)
