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
import warnings

import numpy as np
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload

from ._config import JIT

__all__ = ["layer_forward", "layer_backward", "param_views", "workspace_views",
           "workspace_size", "lstm_forward", "lstm_backward", "tanh_array", "sigmoid_array"]

# Numba's pedantic SSA check complains about the activations once they are
# inlined (inline="always", below); the compiled code is right (the tests
# compare it with libm, the reference and torch). Scoped to these functions' names.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning,
                        message=r"variable '_(tanh|tanh_approx|sigmoid)_impl__locals__")


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
    """(numpy type, clamp, tiny) per precision. Past `clamp` tanh rounds to +-1;
    below `tiny` it rounds to x, and returning x there also keeps the scaling
    by 2^-8 from shifting subnormal inputs' bits away."""
    if bitwidth == 32:
        return np.float32, 10.0, 2e-4
    return np.float64, 20.0, 1e-8


def _tanh_approx(x):  # pragma: no cover - Python stand-in; Numba compiles the overload
    return math.tanh(x)


def _tanh(x, exact):  # pragma: no cover - Python stand-in
    return math.tanh(x)


def _sigmoid(x, exact):  # pragma: no cover - Python stand-in
    return 0.5 * (1.0 + math.tanh(0.5 * x))


@overload(_tanh_approx, inline="always", jit_options=JIT)
def _tanh_approx_impl(x):
    if not isinstance(x, types.Float):
        return None
    ftype, clamp, tiny = _fast_consts(x.bitwidth)
    CLAMP, TINY, ONE, TWO = ftype(clamp), ftype(tiny), ftype(1.0), ftype(2.0)
    SCALE = ftype(2.0 / 256.0)          # u = 2|x| / 2^8, so |u| <= 0.16
    # 1/n for the nested Taylor form expm1(u) = u (1 + u/2 (1 + u/3 (1 + ... u/11))),
    # written out: a loop over a tuple of constants kept LLVM from vectorising
    # the float64 version. The tail u^12/12! ~ 4e-19 is below float64's ulp.
    C2, C3, C4, C5, C6, C7, C8, C9, C10, C11 = (ftype(1.0 / n) for n in range(2, 12))

    def impl(x):
        a = abs(x)
        u = (CLAMP if a > CLAMP else a) * SCALE    # NaN compares False and stays NaN
        p = ONE + u * C11
        p = ONE + u * C10 * p
        p = ONE + u * C9 * p
        p = ONE + u * C8 * p
        p = ONE + u * C7 * p
        p = ONE + u * C6 * p
        p = ONE + u * C5 * p
        p = ONE + u * C4 * p
        p = ONE + u * C3 * p
        p = ONE + u * C2 * p
        e = u * p              # expm1(u)
        # Eight doublings expm1(2u) = expm1(u) (expm1(u) + 2), written out:
        # a loop here trips Numba's SSA check when the function is inlined.
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        t = e / (e + TWO)
        return x if a < TINY else (t if x >= 0 else -t)
    return impl


# All three are inlined by Numba (inline="always"), so that where `exact` is a
# constant (see below) the untaken branch disappears and the loop vectorises.

@overload(_tanh, inline="always", jit_options=JIT)
def _tanh_impl(x, exact):
    if not isinstance(x, types.Float):
        return None

    def impl(x, exact):
        return math.tanh(x) if exact else _tanh_approx(x)
    return impl


@overload(_sigmoid, inline="always", jit_options=JIT)
def _sigmoid_impl(x, exact):
    if not isinstance(x, types.Float):
        return None
    ftype = _fast_consts(x.bitwidth)[0]
    HALF, ONE = ftype(0.5), ftype(1.0)

    def impl(x, exact):
        if exact:
            return ONE / (ONE + math.exp(-x))
        return HALF + HALF * _tanh_approx(HALF * x)
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


# `exact` reaches the loops below as a literal True or False: each loop body is
# an inline="always" function, inlined by Numba into one copy per branch, so LLVM
# sees a constant and deletes the libm path from the fast loop. A runtime flag
# inside the loop kept LLVM from vectorising it (the loop was too large to unswitch).

@njit(inline="always", **JIT)
def _map_tanh(x, out, exact):
    for k in range(x.shape[0]):
        out[k] = _tanh(x[k], exact)


@njit(inline="always", **JIT)
def _map_sigmoid(x, out, exact):
    for k in range(x.shape[0]):
        out[k] = _sigmoid(x[k], exact)


@njit(_sigs(1, 1, 0), **JIT)
def tanh_array(x, out, exact):
    """out[:] = tanh(x) with the kernels' activation (for tests and benchmarks)."""
    if exact:
        _map_tanh(x, out, True)
    else:
        _map_tanh(x, out, False)


@njit(_sigs(1, 1, 0), **JIT)
def sigmoid_array(x, out, exact):
    """out[:] = sigmoid(x) with the kernels' activation."""
    if exact:
        _map_sigmoid(x, out, True)
    else:
        _map_sigmoid(x, out, False)


# --------------------------------------------------------------------------
# LSTM layer
# --------------------------------------------------------------------------

# The step's elementwise work is split into loops that each touch few arrays
# and index from 0: LLVM then proves the accesses safe and vectorises every one
# (checked with --pass-remarks=loop-vectorize). One loop over all of it did not
# vectorise, nor did `range(2 * H, 3 * H)` (Numba's negative-index handling).

@njit(inline="always", **JIT)
def _gates_forward(z, r, b_ih, b_hh, exact):
    """z (4H,): x W_ih^T on entry, the activations i, f, g, o on return."""
    H = z.shape[0] // 4
    for j in range(2 * H):                               # i, f
        z[j] = _sigmoid(z[j] + r[j] + b_ih[j] + b_hh[j], exact)
    for j in range(H):                                   # g
        k = 2 * H + j
        z[k] = _tanh(z[k] + r[k] + b_ih[k] + b_hh[k], exact)
    for j in range(H):                                   # o
        k = 3 * H + j
        z[k] = _sigmoid(z[k] + r[k] + b_ih[k] + b_hh[k], exact)


@njit(inline="always", **JIT)
def _state_forward(z, c_prev, c_t, tc_t, h_t, exact):
    H = c_t.shape[0]
    for j in range(H):
        cj = z[H + j] * c_prev[j] + z[j] * z[2 * H + j]
        tc = _tanh(cj, exact)
        c_t[j] = cj
        tc_t[j] = tc
        h_t[j] = z[3 * H + j] * tc


@njit(inline="always", **JIT)
def _cells_forward(t, gates, rec, b_ih, b_hh, h, c, tanh_c, exact):
    for b in range(gates.shape[1]):
        _gates_forward(gates[t, b], rec[b], b_ih, b_hh, exact)
        _state_forward(gates[t, b], c[t, b], c[t + 1, b], tanh_c[t, b], h[t + 1, b], exact)


@njit(**JIT)
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
        # `exact` becomes a literal in each inlined copy (see the activations).
        if exact:
            _cells_forward(t, gates, rec, b_ih, b_hh, h, c, tanh_c, True)
        else:
            _cells_forward(t, gates, rec, b_ih, b_hh, h, c, tanh_c, False)


@njit(inline="always", **JIT)
def _cell_backward(a, dz, dy, dh, dc, c_prev, tc):
    """a (4H,) the activations; writes dz (4H,), the pre-activation gradients;
    dh (H,) is consumed (it becomes dh_t); dc (H,) becomes the cell gradient for t-1."""
    H = dh.shape[0]
    one = a.dtype.type(1.0)
    for j in range(H):
        dh[j] += dy[j]
    for j in range(H):
        i, f, g, o = a[j], a[H + j], a[2 * H + j], a[3 * H + j]
        dh_t = dh[j]
        dc_t = dc[j] + dh_t * o * (one - tc[j] * tc[j])
        dz[j] = dc_t * g * i * (one - i)
        dz[H + j] = dc_t * c_prev[j] * f * (one - f)
        dz[2 * H + j] = dc_t * i * (one - g * g)
        dz[3 * H + j] = dh_t * tc[j] * o * (one - o)
        dc[j] = dc_t * f


@njit(**JIT)
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
    for t in range(T - 1, -1, -1):
        for b in range(B):
            _cell_backward(gates[t, b], dgates[t, b], dy[t, b], dh[b], dc[b], c[t, b],
                           tanh_c[t, b])
        # dh for step t-1 (dh0 after the last iteration).
        np.dot(dgates[t], w_hh, out=dh)

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


# --------------------------------------------------------------------------
# Entry points: flat buffers in, named views carved inside
#
# Numba unboxes every array argument on each call (about half a microsecond
# apiece); at small sizes that dominated a forward+backward. So the public layer
# passes the flat arrays (parameters, gradients, workspace) and the sizes, and
# the views are carved here, by the same functions Python uses to carve them.
# --------------------------------------------------------------------------

@njit(**JIT)
def param_views(p, I, H):
    """weight_ih (4H, I), weight_hh (4H, H), bias_ih, bias_hh (4H,): torch's order."""
    a, b, c = 4 * H * I, 4 * H * I + 4 * H * H, 4 * H * (I + H + 1)
    return (p[:a].reshape((4 * H, I)), p[a:b].reshape((4 * H, H)),
            p[b:c], p[c:c + 4 * H])


@njit(**JIT)
def _workspace_sizes(T, B, I, H):
    # x, gates, h, c, tanh_c, rec, dy, dgates, dx, dh, dc, tmp_ih, tmp_hh
    return (T * B * I, T * B * 4 * H, (T + 1) * B * H, (T + 1) * B * H, T * B * H, B * 4 * H,
            T * B * H, T * B * 4 * H, T * B * I, B * H, B * H, 4 * H * I, 4 * H * H)


def workspace_size(T, B, I, H):
    """Elements of workspace that one (T, B) call needs."""
    return int(sum(_workspace_sizes(T, B, I, H)))


@njit(**JIT)
def workspace_views(ws, T, B, I, H):
    """(x, gates, h, c, tanh_c, rec, dy, dgates, dx, dh, dc, tmp_ih, tmp_hh) as
    C-contiguous views of the flat workspace, shaped as the kernels take them."""
    n = _workspace_sizes(T, B, I, H)
    # Running offsets, spelled out: an offsets array would be an allocation per call.
    o1 = n[0]
    o2 = o1 + n[1]
    o3 = o2 + n[2]
    o4 = o3 + n[3]
    o5 = o4 + n[4]
    o6 = o5 + n[5]
    o7 = o6 + n[6]
    o8 = o7 + n[7]
    o9 = o8 + n[8]
    o10 = o9 + n[9]
    o11 = o10 + n[10]
    o12 = o11 + n[11]
    o13 = o12 + n[12]
    return (ws[:o1].reshape((T, B, I)), ws[o1:o2].reshape((T, B, 4 * H)),
            ws[o2:o3].reshape((T + 1, B, H)), ws[o3:o4].reshape((T + 1, B, H)),
            ws[o4:o5].reshape((T, B, H)), ws[o5:o6].reshape((B, 4 * H)),
            ws[o6:o7].reshape((T, B, H)), ws[o7:o8].reshape((T, B, 4 * H)),
            ws[o8:o9].reshape((T, B, I)), ws[o9:o10].reshape((B, H)),
            ws[o10:o11].reshape((B, H)), ws[o11:o12].reshape((4 * H, I)),
            ws[o12:o13].reshape((4 * H, H)))


def _entry_sigs(n_arrays, *extra):
    return [types.void(*([types.Array(ft, 1, "C")] * n_arrays), types.int64, types.int64,
                       types.int64, types.int64, *extra)
            for ft in (types.float32, types.float64)]


@njit(_entry_sigs(2, types.boolean), **JIT)
def layer_forward(p, ws, T, B, I, H, exact):
    """``lstm_forward`` on the flat parameters and workspace; h0, c0 are read from
    the workspace's h[0], c[0] and x from its x."""
    w_ih, w_hh, b_ih, b_hh = param_views(p, I, H)
    x, gates, h, c, tanh_c, rec, _, _, _, _, _, _, _ = workspace_views(ws, T, B, I, H)
    lstm_forward(x, w_ih, w_hh, b_ih, b_hh, gates, h, c, tanh_c, rec, exact)


@njit(_entry_sigs(3), **JIT)
def layer_backward(p, g, ws, T, B, I, H):
    """``lstm_backward`` on the flat buffers; dy, dh_n, dc_n are read from the
    workspace's dy, dh, dc, and the gradients are added into g."""
    w_ih, w_hh, _, _ = param_views(p, I, H)
    dw_ih, dw_hh, db_ih, db_hh = param_views(g, I, H)
    x, gates, h, c, tanh_c, _, dy, dgates, dx, dh, dc, tmp_ih, tmp_hh = \
        workspace_views(ws, T, B, I, H)
    lstm_backward(dy, dh, dc, x, w_ih, w_hh, gates, h, c, tanh_c, dgates, dx,
                  dw_ih, dw_hh, db_ih, db_hh, tmp_ih, tmp_hh)
