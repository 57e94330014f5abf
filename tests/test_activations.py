"""Accuracy of the kernels' fast tanh and sigmoid against float64 np.tanh,
over the whole real line, per dtype."""
import numpy as np
import pytest
from scipy.special import expit

from fastlstm._activations import sigmoid_array, tanh_array

# Measured maxima: tanh 4.8 ulp (float64), 2.2 ulp (float32: the rational form; 3.6 with the
# series float64 uses).
TANH_ULPS = {np.float64: 8, np.float32: 6}


def real_line(dtype):
    with np.errstate(over="ignore"):
        mag = np.concatenate([np.logspace(-320, 310, 100001), np.linspace(0, 25, 100001),
                              [np.finfo(dtype).tiny, np.finfo(dtype).max, 5e-324]])
        x = np.concatenate([mag, -mag]).astype(dtype)
    return x[np.isfinite(x)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "libm"])
def test_tanh_accuracy(dtype, exact):
    x = real_line(dtype)
    out = np.empty_like(x)
    tanh_array(x, out, exact)
    want = np.tanh(x.astype(np.float64))
    nz = want != 0
    rel = np.abs(out[nz] - want[nz]) / np.abs(want[nz])
    assert rel.max() <= TANH_ULPS[dtype] * np.finfo(dtype).eps
    assert np.all(out[~nz] == 0)
    assert np.all(np.abs(out) <= 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "libm"])
def test_sigmoid_accuracy(dtype, exact):
    # 0.5 + 0.5 tanh(x/2): accurate to an absolute ulp of 1, not relatively
    # near 0 (where it feeds products that are tiny anyway).
    x = real_line(dtype)
    out = np.empty_like(x)
    sigmoid_array(x, out, exact)
    want = expit(x.astype(np.float64))
    assert np.abs(out - want).max() <= 2 * np.finfo(dtype).eps
    assert np.all((out >= 0) & (out <= 1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "libm"])
def test_activation_specials(dtype, exact):
    x = np.array([np.inf, -np.inf, np.nan, 0.0, 1e4, -1e4], dtype)
    out = np.empty_like(x)
    with np.errstate(all="raise"):  # no overflow: these are compiled, but be explicit
        tanh_array(x, out, exact)
    np.testing.assert_array_equal(out, np.array([1, -1, np.nan, 0, 1, -1], dtype))
    sigmoid_array(x, out, exact)
    np.testing.assert_array_equal(out, np.array([1, 0, np.nan, 0.5, 1, 0], dtype))
