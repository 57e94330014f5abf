"""The GEMMs of one fwd+bwd, timed alone (for ``fastlstm bench --profile``)."""
import numpy as np
from numba import njit

from ._config import JIT
from ._timing import median_time


@njit(**JIT)
def _input_gemm(x, w_ih, out):
    np.dot(x, w_ih.T, out=out)


@njit(**JIT)
def _recurrent_gemms(h, dz_t, w_hh, rec, dh, T):
    for _ in range(T):
        np.dot(h, w_hh.T, out=rec)
        np.dot(dz_t, w_hh, out=dh)


@njit(**JIT)
def _weight_gemms(dz, x, hs, w_ih, dx, g_ih, g_hh):
    np.dot(dz, w_ih, out=dx)
    np.dot(dz.T, x, out=g_ih)
    np.dot(dz.T, hs, out=g_hh)


def gemm_parts(impl, x, h, hs, dz, w_ih, w_hh, T, B, min_time):
    rec, dh = np.empty((B, w_hh.shape[0]), x.dtype), np.empty_like(h)
    dz_t = dz[:B]
    dx, g_ih, g_hh = np.empty_like(x), np.empty_like(w_ih), np.empty_like(w_hh)
    gates = np.empty((x.shape[0], w_ih.shape[0]), x.dtype)
    if impl == "fastlstm":
        fns = {"input GEMM": lambda: _input_gemm(x, w_ih, gates),
               "recurrent GEMMs": lambda: _recurrent_gemms(h, dz_t, w_hh, rec, dh, T),
               "dx and weight-gradient GEMMs":
                   lambda: _weight_gemms(dz, x, hs, w_ih, dx, g_ih, g_hh)}
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
