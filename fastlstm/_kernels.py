"""Numba kernels: one LSTM layer's forward and backward passes, in place.

The same maths as :mod:`fastlstm.reference` (its docstring carries the
equations), arranged the way fast LSTMs (cuDNN, oneDNN) arrange it:

* forward: the input projection of all T steps is one GEMM before the
  recurrence; each step is one small GEMM ``h_{t-1} W_hh^T`` plus one fused
  elementwise pass over the gates;
* backward: each step is one fused elementwise pass plus one GEMM
  ``dz W_hh``; dx, dW_ih and dW_hh are one GEMM each over all T*B rows after
  the recurrence.

Every kernel writes into buffers its caller allocated and returns nothing, so
nothing is allocated per step. Gate pre-activations and activations are kept
as (T, B, 4H): for one sequence the H values of one gate are contiguous, so the
elementwise loops vectorise.

The activations live here too, not in a module of their own: Numba's on-disk
cache only notices edits to the file of the cached function itself.
"""
import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._config import JIT

__all__ = ["lstm_forward", "lstm_backward", "tanh_array", "sigmoid_array"]


# --------------------------------------------------------------------------
# Activations
#
# libm's tanh/exp are scalar calls (no SVML in this llvmlite), which keeps the
# gate loop from vectorising. Instead:
#   tanh(x) = e / (e + 2) with e = expm1(2|x|), sign restored,
#   expm1(2a) computed as expm1(u) by its Taylor series at u = 2a / 2^k, then
#   k doublings expm1(2u) = expm1(u) * (expm1(u) + 2).
# Only + * / and a compare: LLVM vectorises it. The doublings do not amplify
# the relative error for small arguments, and for large ones the error in e is
# divided by (e + 2) in the quotient. |x| is clamped where tanh rounds to 1.
# sigmoid(x) = 0.5 + 0.5 tanh(x / 2): exact to an absolute ulp of 0.5.
# tests/test_activations.py measures the error over the whole real line.
# --------------------------------------------------------------------------

def _fast_consts(bitwidth):
    """(numpy type, clamp, doublings k, Taylor degree, tiny) per precision.

    Below `tiny`, tanh(x) rounds to x; returning x there also keeps the scaling
    by 2^-k from shifting subnormal inputs' bits away."""
    if bitwidth == 32:
        return np.float32, 10.0, 6, 7, 2e-4    # |u| <= 0.3125; tail u^8/8! ~ 7e-9
    return np.float64, 20.0, 8, 11, 1e-8       # |u| <= 0.15625; tail u^12/12! ~ 4e-19


def _tanh(x, exact):  # pragma: no cover - Python stand-in; Numba compiles the overload
    return math.tanh(x)


def _sigmoid(x, exact):  # pragma: no cover - Python stand-in
    return 0.5 * (1.0 + math.tanh(0.5 * x))


@overload(_tanh, jit_options=JIT)
def _tanh_impl(x, exact):
    if not isinstance(x, types.Float):
        return None
    ftype, clamp, doublings, degree, tiny = _fast_consts(x.bitwidth)
    CLAMP, TINY = ftype(clamp), ftype(tiny)
    SCALE = ftype(2.0 / 2.0 ** doublings)
    ONE, TWO = ftype(1.0), ftype(2.0)
    # Reciprocals 1/degree, ..., 1/2 for the nested Taylor form
    # expm1(u) = u (1 + u/2 (1 + u/3 (1 + ...))).
    INV = tuple(ftype(1.0 / n) for n in range(degree, 1, -1))

    def impl(x, exact):
        if exact:
            return math.tanh(x)
        a = abs(x)
        if a > CLAMP:          # NaN compares False and stays NaN
            a = CLAMP
        u = a * SCALE
        p = ONE
        for c in INV:
            p = ONE + u * c * p
        e = u * p
        for _ in range(doublings):
            e = e * (e + TWO)
        t = e / (e + TWO)
        if a < TINY:
            return x
        return t if x >= 0 else -t
    return impl


@overload(_sigmoid, jit_options=JIT)
def _sigmoid_impl(x, exact):
    if not isinstance(x, types.Float):
        return None
    ftype = _fast_consts(x.bitwidth)[0]
    HALF, ONE = ftype(0.5), ftype(1.0)

    def impl(x, exact):
        if exact:
            return ONE / (ONE + math.exp(-x))
        return HALF + HALF * _tanh(HALF * x, exact)
    return impl


def _sigs(*kinds):
    """Explicit float32 and float64 signatures; kinds are the array ranks,
    0 for the trailing `exact` flag."""
    out = []
    for ft in (types.float32, types.float64):
        args = []
        for k in kinds:
            if k == 0:
                args.append(types.boolean)
            else:
                args.append(types.Array(ft, k, "C"))
        out.append(types.void(*args))
    return out


@njit(_sigs(1, 1, 0), **JIT)
def tanh_array(x, out, exact):
    """out[:] = tanh(x) with the kernels' activation (for tests and benchmarks)."""
    for k in range(x.shape[0]):
        out[k] = _tanh(x[k], exact)


@njit(_sigs(1, 1, 0), **JIT)
def sigmoid_array(x, out, exact):
    """out[:] = sigmoid(x) with the kernels' activation."""
    for k in range(x.shape[0]):
        out[k] = _sigmoid(x[k], exact)


# --------------------------------------------------------------------------
# LSTM layer
# --------------------------------------------------------------------------

@njit(_sigs(3, 2, 2, 1, 1, 3, 3, 3, 3, 2, 0), **JIT)
def lstm_forward(x, w_ih, w_hh, b_ih, b_hh, gates, h, c, tanh_c, rec, exact):
    """Forward over the whole sequence.

    x (T, B, I); w_ih (4H, I); w_hh (4H, H); b_ih, b_hh (4H,).
    Writes gates (T, B, 4H) activations i, f, g, o; h, c (T+1, B, H) whose
    entry 0 holds h0, c0 on entry and entry t+1 receives step t; tanh_c (T, B, H)
    = tanh(c_t), kept for backward; rec (B, 4H) is scratch.
    """
    T, B, I = x.shape
    H = h.shape[2]
    # All input projections at once: one large GEMM instead of T small ones.
    np.dot(x.reshape((T * B, I)), w_ih.T, out=gates.reshape((T * B, 4 * H)))
    for t in range(T):
        np.dot(h[t], w_hh.T, out=rec)
        g_t, c_prev, c_t, h_t, tc_t = gates[t], c[t], c[t + 1], h[t + 1], tanh_c[t]
        for b in range(B):
            z, r = g_t[b], rec[b]
            for j in range(H):
                i = _sigmoid(z[j] + r[j] + b_ih[j] + b_hh[j], exact)
                f = _sigmoid(z[H + j] + r[H + j] + b_ih[H + j] + b_hh[H + j], exact)
                g = _tanh(z[2 * H + j] + r[2 * H + j] + b_ih[2 * H + j] + b_hh[2 * H + j],
                          exact)
                o = _sigmoid(z[3 * H + j] + r[3 * H + j] + b_ih[3 * H + j] + b_hh[3 * H + j],
                             exact)
                cj = f * c_prev[b, j] + i * g
                tc = _tanh(cj, exact)
                z[j], z[H + j], z[2 * H + j], z[3 * H + j] = i, f, g, o
                c_t[b, j] = cj
                tc_t[b, j] = tc
                h_t[b, j] = o * tc


@njit(_sigs(3, 2, 2, 3, 2, 2, 3, 3, 3, 3, 3, 3, 2, 2, 1, 1, 2, 2), **JIT)
def lstm_backward(dy, dh, dc, x, w_ih, w_hh, gates, h, c, tanh_c,
                  dgates, dx, dw_ih, dw_hh, db_ih, db_hh, tmp_ih, tmp_hh):
    """Backward through time over the sequence ``lstm_forward`` last ran.

    dy (T, B, H). dh, dc (B, H): dh_n, dc_n on entry, dh0, dc0 on return.
    x, w_ih, w_hh, gates, h, c, tanh_c: as forward left them.
    Writes dgates (T, B, 4H) (the pre-activation gradients) and dx (T, B, I);
    adds into dw_ih (4H, I), dw_hh (4H, H), db_ih, db_hh (4H,).
    tmp_ih, tmp_hh (shapes of dw_ih, dw_hh) are scratch.
    """
    T, B, I = x.shape
    H = h.shape[2]
    one = x.dtype.type(1.0)
    for t in range(T - 1, -1, -1):
        g_t, dz_t, c_prev, tc_t, dy_t = gates[t], dgates[t], c[t], tanh_c[t], dy[t]
        for b in range(B):
            a, dz = g_t[b], dz_t[b]
            for j in range(H):
                i, f, g, o = a[j], a[H + j], a[2 * H + j], a[3 * H + j]
                tc = tc_t[b, j]
                dh_t = dy_t[b, j] + dh[b, j]
                dc_t = dc[b, j] + dh_t * o * (one - tc * tc)
                dz[j] = dc_t * g * i * (one - i)
                dz[H + j] = dc_t * c_prev[b, j] * f * (one - f)
                dz[2 * H + j] = dc_t * i * (one - g * g)
                dz[3 * H + j] = dh_t * tc * o * (one - o)
                dc[b, j] = dc_t * f
        # dh for step t-1 (dh0 after the last iteration).
        np.dot(dz_t, w_hh, out=dh)

    # Everything that does not feed the recurrence: one GEMM each over T*B rows.
    dz2 = dgates.reshape((T * B, 4 * H))
    np.dot(dz2, w_ih, out=dx.reshape((T * B, I)))
    np.dot(dz2.T, x.reshape((T * B, I)), out=tmp_ih)
    np.dot(dz2.T, h.reshape(((T + 1) * B, H))[:T * B], out=tmp_hh)
    # BLAS would overwrite; gradients accumulate across calls, so add.
    acc_ih, src_ih = dw_ih.reshape(dw_ih.size), tmp_ih.reshape(tmp_ih.size)
    for k in range(acc_ih.size):
        acc_ih[k] += src_ih[k]
    acc_hh, src_hh = dw_hh.reshape(dw_hh.size), tmp_hh.reshape(tmp_hh.size)
    for k in range(acc_hh.size):
        acc_hh[k] += src_hh[k]
    for r in range(T * B):
        row = dz2[r]
        for k in range(4 * H):
            db_ih[k] += row[k]
            db_hh[k] += row[k]
