"""The micro-kernel products of fastlstm._gemm against NumPy in float64."""
import numpy as np
import pytest
from numba import njit

from fastlstm import _gemm


@njit
def _packed(a, b, packed, c):
    _gemm.pack_panels(b, packed)
    _gemm.packed_product(a, packed, c)


@njit
def _gradient(a, b, c, acc):
    _gemm.gradient_product(a, b, c, acc)


def _rel(got, want):
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)


TOL = {np.float32: 1e-5, np.float64: 1e-13}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("M,K,panels", [(1, 1, 1), (3, 7, 2), (6, 33, 1), (9, 130, 3),
                                        (1, 7, 4), (1, 130, 5)])
def test_packed_product(dtype, M, K, panels):
    rng = np.random.default_rng(M * K)
    nr = 64 if dtype == np.float32 else 32
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, panels * nr)).astype(dtype)
    c = np.full((M, panels * nr), np.nan, dtype)
    _packed(a, b, np.empty((panels, K, nr), dtype), c)
    assert _rel(c, a.astype(np.float64) @ b) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_one_row_sums_as_each_row_of_several(dtype):
    """A one-row product sums each element in the same order as the same row in a
    product of several: bitwise equal (a stream's step against the forward over the
    same steps)."""
    rng = np.random.default_rng(1)
    nr = 64 if dtype == np.float32 else 32
    K, panels = _gemm.K_PANEL + 9, 5
    a = rng.standard_normal((3, K)).astype(dtype)
    b = rng.standard_normal((K, panels * nr)).astype(dtype)
    packed = np.empty((panels, K, nr), dtype)
    c3, c1 = np.empty((3, panels * nr), dtype), np.empty((1, panels * nr), dtype)
    _packed(a, b, packed, c3)
    _packed(a[1:2].copy(), b, packed, c1)
    assert np.array_equal(c1[0], c3[1])


# K past one block of K_BLOCK rows (the blocks add into C), n with 1, 2 and 3 rows left
# over after the micro-kernel's 4, and K = 0 (an empty sum).
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("K,n,panels", [(1, 1, 1), (5, 3, 2), (_gemm.K_BLOCK + 3, 6, 1),
                                        (3 * _gemm.K_BLOCK, 9, 2), (0, 4, 1)])
def test_gradient_product(dtype, K, n, panels):
    rng = np.random.default_rng(K + n)
    nr = 64 if dtype == np.float32 else 32
    a = rng.standard_normal((K, n)).astype(dtype)
    b = rng.standard_normal((K, panels * nr)).astype(dtype)
    want = a.astype(np.float64).T @ b
    c = np.full((n, panels * nr), np.nan, dtype)
    _gradient(a, b, c, False)           # overwrites C, never reads it (NaN in there)
    assert not np.isnan(c).any()
    assert _rel(c, want) < TOL[dtype] if K else not c.any()
    start = rng.standard_normal(c.shape).astype(dtype)
    c = start.copy()
    _gradient(a, b, c, True)
    assert _rel(c, start + want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_gradient_product_pays_needs_whole_panels(dtype):
    nr = 64 if dtype == np.float32 else 32
    size = np.dtype(dtype).itemsize
    assert _gemm.gradient_product_pays(16, 4 * nr, size)
    assert not _gemm.gradient_product_pays(16, 4 * nr + 4, size)
    assert not _gemm.gradient_product_pays(_gemm.GRADIENT_C_BYTES // (nr * size) + 1, nr, size)


@njit
def _narrow(a, b, c):
    _gemm.narrow_product(a, b, c)


# One, two and three vectors wide; M with 0 to 3 rows left over after the blocks of 4.
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("M,K,vectors", [(1, 1, 1), (6, 33, 2), (9, 130, 3), (8, 256, 1),
                                         (7, 5, 3)])
def test_narrow_product(dtype, M, K, vectors):
    rng = np.random.default_rng(M * K + vectors)
    width = 16 if dtype == np.float32 else 8
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, vectors * width)).astype(dtype)
    c = np.full((M, vectors * width), np.nan, dtype)
    assert _gemm.narrow_pays(vectors * width, np.dtype(dtype).itemsize)
    _narrow(a, b, c)
    assert _rel(c, a.astype(np.float64) @ b) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_narrow_pays_below_one_panel_only(dtype):
    width, size = (16, 4) if dtype == np.float32 else (8, 8)
    assert not _gemm.narrow_pays(width + 1, size)
    assert not _gemm.narrow_pays(4 * width, size)       # a whole panel: packed_product's
    assert not _gemm.narrow_pays(0, size)


@njit
def _dots(w, ld, h, K, out):
    _gemm.row_dots(w, 0, K, out.shape[1], h, out)


# rows and sequences past the kernels' shapes, K past a multiple of the SIMD width, K = 0
@pytest.mark.parametrize("kind", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("B,R,K", [(1, 1, 1), (1, 13, 37), (7, 9, 37), (4, 16, 256), (2, 8, 80),
                                   (3, 9, 0)])
def test_dot_rows(kind, B, R, K):
    from fastlstm._columns import to_bfloat16
    rng = np.random.default_rng(B + R + K)
    dtype = np.float64 if kind == "float64" else np.float32
    w = rng.standard_normal((R, K)).astype(dtype)
    h = rng.standard_normal((B, K)).astype(dtype)
    if kind == "bfloat16":
        w = to_bfloat16(w)
        want = h @ (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64).T
    else:
        want = h @ w.astype(np.float64).T
    out = np.full((B, R), np.nan, dtype)
    _dots(w.reshape(-1), K, h, K, out)
    assert np.abs(out - want).max() <= TOL[dtype] * max(np.abs(want).max(), 1.0) * 10
