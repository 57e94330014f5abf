"""The GEMMs of one fwd+bwd, timed alone (for ``fastlstm bench --profile``).

fastlstm's are timed the way the layer runs them: each part of the batch (see
_threads) on its own thread with single-threaded BLAS, the parts at once, the
recurrent products, the input projection and dx from packed panels (_gemm) or from
W_hh^T, and the weight gradients from dz's rows in place, in chunks of steps, where
the kernels do."""
import numpy as np
from numba import njit

from . import _gemm, _recurrence
from ._config import JIT, follow
from ._gemm import (
    NV,
    VECTOR_BYTES,
    gradient_product,
    gradient_product_pays,
    narrow_pays,
    narrow_product,
    packed_product,
)
from ._recurrence import CHUNK_BYTES, transposed_product_pays
from ._threads import run_parts, single_threaded
from ._timing import median_time

follow(__file__, _gemm.__file__, _recurrence.__file__)


@njit(**JIT)
def _input_gemm(x, w_ih, panels, out):
    if panels.shape[0] > 0:
        packed_product(x, panels, out)
    else:
        np.dot(x, w_ih.T, out=out)


@njit(**JIT)
def _recurrent_gemms(h, dz_t, w_hh, w_hhT, fwd_panels, bwd_panels, rec, dh, T, nn):
    for _ in range(T):
        if fwd_panels.shape[0] > 0:
            packed_product(h, fwd_panels, rec)
        elif nn:
            np.dot(h, w_hhT, out=rec)
        else:
            np.dot(h, w_hh.T, out=rec)
        if bwd_panels.shape[0] > 0:
            packed_product(dz_t, bwd_panels, dh)
        else:
            np.dot(dz_t, w_hh, out=dh)


def _panels(b, nr):
    """b (K, N) as the kernels pack it: (N // nr, K, nr), or none when N % nr (or nr 0)."""
    K, N = b.shape
    if not nr or N % nr:
        return np.empty((0, K, max(nr, 1)), b.dtype)
    return np.ascontiguousarray(b.reshape(K, N // nr, nr).transpose(1, 0, 2))


@njit(**JIT)
def _weight_gemms(dz, x, hs, w_ih, panels, narrow, dx, g_ih, g_hh, in_place, rows):
    """dx and the weight gradients over chunks of `rows` rows, as the kernels run them
    (see _recurrence.CHUNK_BYTES)."""
    g_ihT = g_ih.reshape((g_ih.shape[1], g_ih.shape[0]))
    g_hhT = g_hh.reshape((g_hh.shape[1], g_hh.shape[0]))
    for r0 in range(0, dz.shape[0], rows):
        r1 = min(dz.shape[0], r0 + rows)
        dzc, xc, hc, dxc = dz[r0:r1], x[r0:r1], hs[r0:r1], dx[r0:r1]
        if panels.shape[0] > 0:
            packed_product(dzc, panels, dxc)
        elif narrow:
            narrow_product(dzc, w_ih, dxc)
        else:
            np.dot(dzc, w_ih, out=dxc)
        if in_place:        # as the kernels: dW^T, from dz's rows in place
            gradient_product(xc, dzc, g_ihT, r0 > 0)
            gradient_product(hc, dzc, g_hhT, r0 > 0)
        else:
            np.dot(dzc.T, xc, out=g_ih)
            np.dot(dzc.T, hc, out=g_hh)


@njit(**JIT)
def _recurrent_all_rows(hs, dz, w_hh, w_hhT, rec, dh, nn):
    """The recurrent products' multiply-adds as two GEMMs over all T*B rows: what the
    T per-step products would cost at the rate of one large GEMM."""
    if nn:
        np.dot(hs, w_hhT, out=rec)
    else:
        np.dot(hs, w_hh.T, out=rec)
    np.dot(dz, w_hh, out=dh)


#: not a part of the call: the recurrent GEMMs' time at the rate of one GEMM over all
#: rows, beside their real time (their per-step calls pay OpenBLAS's packing of W_hh
#: each step; a large GEMM pays it once)
ALL_ROWS = "recurrent GEMMs at the all-rows rate"


def _fastlstm_parts(x, h, hs, dz, w_ih, w_hh, T, B, parts):
    """{part name: a call running it on every part of the batch at once}, and ALL_ROWS."""
    nn = transposed_product_pays(x.itemsize, w_hh.shape[1], w_hh.shape[1])
    w_hhT = np.ascontiguousarray(w_hh.T)
    nr = NV * VECTOR_BYTES // x.itemsize          # _gemm's panel width
    # the kernels use the packed products where a call has one thread (see lstm._forward)
    one = single_threaded(parts, T * B * w_ih.shape[0] * (w_ih.shape[1] + w_hh.shape[1]))
    fwd_panels, bwd_panels, in_panels, dx_panels = (
        _panels(b, nr if one else 0) for b in (w_hhT, w_hh, np.ascontiguousarray(w_ih.T), w_ih))
    narrow = one and narrow_pays(w_ih.shape[1], x.itemsize)
    in_place = one and gradient_product_pays(max(w_ih.shape[1], w_hh.shape[1]), w_ih.shape[0],
                                             x.itemsize)
    x3, hs3, dz3 = (a.reshape(T, B, -1) for a in (x, hs, dz))
    groups = {"input GEMM": [], "recurrent GEMMs": [], "dx and weight-gradient GEMMs": [],
              ALL_ROWS: []}
    for r in range(parts):
        cut = slice(r * B // parts, (r + 1) * B // parts)
        n = cut.stop - cut.start
        xr, hsr, dzr = (np.ascontiguousarray(a[:, cut]).reshape(T * n, -1)
                        for a in (x3, hs3, dz3))
        hr, dz_t = np.ascontiguousarray(h[cut]), dzr[:n]
        gates, rec, dh = (np.empty((T * n, w_ih.shape[0]), x.dtype),
                          np.empty((n, w_hh.shape[0]), x.dtype), np.empty_like(hr))
        dx, g_ih, g_hh = np.empty_like(xr), np.empty_like(w_ih), np.empty_like(w_hh)
        groups["input GEMM"].append(
            lambda xr=xr, gates=gates: _input_gemm(xr, w_ih, in_panels, gates))
        groups["recurrent GEMMs"].append(
            lambda hr=hr, dz_t=dz_t, rec=rec, dh=dh:
            _recurrent_gemms(hr, dz_t, w_hh, w_hhT, fwd_panels, bwd_panels, rec, dh, T, nn))
        hd = np.empty_like(hsr)
        groups[ALL_ROWS].append(
            lambda hsr=hsr, dzr=dzr, gates=gates, hd=hd:
            _recurrent_all_rows(hsr, dzr, w_hh, w_hhT, gates, hd, nn))
        rows = (max(1, CHUNK_BYTES // (n * w_ih.shape[0] * x.itemsize)) * n if in_place
                else T * n)
        groups["dx and weight-gradient GEMMs"].append(
            lambda dzr=dzr, xr=xr, hsr=hsr, dx=dx, g_ih=g_ih, g_hh=g_hh, rows=rows:
            _weight_gemms(dzr, xr, hsr, w_ih, dx_panels, narrow, dx, g_ih, g_hh, in_place,
                          rows))
    return {k: (calls[0] if parts == 1 else (lambda calls=calls: run_parts(calls)))
            for k, calls in groups.items()}


def gemm_parts(impl, x, h, hs, dz, w_ih, w_hh, T, B, min_time, parts=1):
    """{part: median seconds}. `parts`: how many parts fastlstm splits this batch into.
    fastlstm's has ALL_ROWS too, which is not a part of the call."""
    if impl == "fastlstm":
        fns = _fastlstm_parts(x, h, hs, dz, w_ih, w_hh, T, B, parts)
    else:  # the reference: per step, as it is written
        xs = x.reshape(T, B, -1)
        hs3 = hs.reshape(T, B, -1)
        dz3 = dz.reshape(T, B, -1)

        def recurrent():
            for t in range(T):
                h @ w_hh.T
                dz3[t] @ w_hh

        def weights():
            for t in range(T):
                dz3[t].T @ xs[t]
                dz3[t].T @ hs3[t]
                dz3[t] @ w_ih
        fns = {"input GEMM": lambda: [xs[t] @ w_ih.T for t in range(T)],
               "recurrent GEMMs": recurrent,
               "dx and weight-gradient GEMMs": weights}
    return {k: median_time(f, min_time=min_time) for k, f in fns.items()}
