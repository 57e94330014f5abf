"""Numba kernels: one LSTM layer's forward and backward passes, in place.

The same maths as :mod:`fastlstm.reference` (its docstring carries the
equations), arranged the way fast LSTMs (cuDNN, oneDNN) arrange it:

* forward: the input projection of all T steps is one GEMM before the
  recurrence; each step is one small GEMM ``h_{t-1} W_hh^T`` plus one fused
  elementwise pass over the gates;
* backward: each step is one fused elementwise pass plus one GEMM
  ``dz W_hh``; dx, dW_ih, dW_hh and db, which do not feed the recurrence, are
  GEMMs over many rows, run in chunks of steps as soon as the recurrence has made
  their dz (see CHUNK_BYTES), or over all T*B rows after it where BLAS runs them.

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
from numba.core import cgutils
from numba.core.errors import NumbaIRAssumptionWarning
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

from . import _gemm, _layout, _spin
from ._config import JIT, follow
from ._gemm import (
    gradient_product,
    gradient_product_pays,
    narrow_pays,
    narrow_product,
    pack_panels,
    pack_panels_transposed,
    packed_product,
    panel_width,
)
from ._spin import (
    BACKWARD,
    CMD,
    DONE,
    FORWARD,
    JOB,
    SEQ,
    load_acquire,
    spin_while_equal,
    store_release,
)

# the layout tables, the packed product and the spin-wait are compiled into these kernels
follow(__file__, _layout.__file__, _gemm.__file__, _spin.__file__)

__all__ = ["layer_forward", "layer_backward", "rows_forward", "rows_backward", "serve_rows",
           "opts_bits", "OPTS", "reverse_in_time", "zero_padding", "param_views",
           "workspace_views", "lstm_forward", "lstm_backward", "tanh_array", "sigmoid_array",
           "transposed_product_pays"]

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


def _expm1_series(u):  # pragma: no cover - Python stand-in; Numba compiles the overload
    return math.expm1(u)


@overload(_expm1_series, inline="always", jit_options=JIT)
def _expm1_series_impl(u):
    """expm1(u) for |u| <= 0.16 (float64) or 0.08 (float32), by its Taylor series
    u (1 + u (1/2! + u (1/3! + ...))) in Horner's form, one multiply-add per term (the
    nested form u (1 + u/2 (1 + u/3 (...))) took two: at float64's eleven terms, a fifth
    of tanh's work). Written out: a loop over a tuple of constants kept LLVM from
    vectorising the float64 version. float64 takes the terms to u^11/11! (the tail
    u^12/12! ~ 4e-19 is below its ulp); float32, whose |u| is at most 20/256, to u^5/5!
    (the tail u^6/6! < 3e-10, far below its ulp of 6e-8)."""
    if not isinstance(u, types.Float):
        return None
    ftype = _fast_consts(u.bitwidth)[0]
    ONE = ftype(1.0)
    F2, F3, F4, F5, F6, F7, F8, F9, F10, F11 = (ftype(1.0 / math.factorial(n))
                                                for n in range(2, 12))
    if u.bitwidth == 32:
        def impl(u):
            p = F5 * u + F4
            p = p * u + F3
            p = p * u + F2
            p = p * u + ONE
            return u * p
        return impl

    def impl(u):
        p = F11 * u + F10
        p = p * u + F9
        p = p * u + F8
        p = p * u + F7
        p = p * u + F6
        p = p * u + F5
        p = p * u + F4
        p = p * u + F3
        p = p * u + F2
        p = p * u + ONE
        return u * p
    return impl


@overload(_tanh_approx, inline="always", jit_options=JIT)
def _tanh_approx_impl(x):
    if not isinstance(x, types.Float):
        return None
    ftype, clamp, tiny = _fast_consts(x.bitwidth)
    CLAMP, TINY, TWO = ftype(clamp), ftype(tiny), ftype(2.0)
    SCALE = ftype(2.0 / 256.0)          # u = 2|x| / 2^8, so |u| <= 0.16

    def impl(x):
        a = abs(x)
        u = (CLAMP if a > CLAMP else a) * SCALE    # NaN compares False and stays NaN
        e = _expm1_series(u)
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
# LSTM layer, one direction
#
# Beyond the plain cell, a layer may have: a projection h_t = W_hr m_t of the
# cell output m_t = o_t * tanh(c_t) (torch's proj_size; without it h_t = m_t);
# per-sequence lengths (sequence b runs steps [0, lengths[b]); past them its
# state is carried unchanged and its gradients pass straight through); a cell
# clip (c_t clipped to [-clip, clip]; clip = inf for none); and the variants,
# whose equations fastlstm.reference writes out:
#
#   peephole    i and f see w_ci * c_{t-1}, w_cf * c_{t-1}; o sees w_co * c~_t;
#   layer_norm  LN over the 4H features of x W_ih^T and of h W_hh^T, and over
#               the H of the new cell before its tanh (the carried cell is not
#               normalised); the two LN biases are folded into the gates' bias;
#   zoneout     c_t = z_c c_{t-1} + (1 - z_c) c~_t, h_t = z_h h_{t-1} + (1 - z_h) h~_t,
#               with c~_t, h~_t the cell's own new state;
#   rdrop       recurrent dropout: W_hh sees h_{t-1} * mask.
#
# The plain cell keeps its own loops, the fast path; a cell with any variant runs
# the general step (_cell_forward_v / _cell_backward_v), whose flags do not change
# inside a call. Its extra work is O(B H) per step beside the O(B H P) products.
# --------------------------------------------------------------------------

# The step's elementwise work is split into loops that each touch few arrays
# and index from 0: LLVM then proves the accesses safe and vectorises every one
# (checked with --pass-remarks=loop-vectorize). One loop over all of it did not
# vectorise, nor did `range(2 * H, 3 * H)` (Numba's negative-index handling).

@njit(inline="always", **JIT)
def _gates_forward(z, r, bias, exact):
    """z (4H,): x W_ih^T on entry, the activations i, f, g, o on return."""
    H = z.shape[0] // 4
    for j in range(2 * H):                               # i, f
        z[j] = _sigmoid(z[j] + r[j] + bias[j], exact)
    for j in range(H):                                   # g
        k = 2 * H + j
        z[k] = _tanh(z[k] + r[k] + bias[k], exact)
    for j in range(H):                                   # o
        k = 3 * H + j
        z[k] = _sigmoid(z[k] + r[k] + bias[k], exact)


@njit(inline="always", **JIT)
def _state_forward(z, c_prev, c_t, tc_t, m_t, clip, exact):
    H = c_t.shape[0]
    for j in range(H):
        cj = z[H + j] * c_prev[j] + z[j] * z[2 * H + j]
        cj = clip if cj > clip else (-clip if cj < -clip else cj)   # NaN passes
        tc = _tanh(cj, exact)
        c_t[j] = cj
        tc_t[j] = tc
        m_t[j] = z[3 * H + j] * tc


@njit(inline="always", **JIT)
def _cells_forward(t, gates, rec, bias, lengths, clip, c, tanh_c, m, exact):
    for b in range(gates.shape[1]):
        if t < lengths[b]:
            _gates_forward(gates[t, b], rec[b], bias, exact)
            _state_forward(gates[t, b], c[t, b], c[t + 1, b], tanh_c[t, b], m[t, b], clip,
                           exact)
        else:            # finished: carry the cell; m is zeroed so it adds nothing later
            c[t + 1, b] = c[t, b]
            m[t, b] = 0


@njit(inline="always", **JIT)
def _layer_norm(x, xn, gain):
    """x (n,) -> gain * xn in place, xn = (x - mean) / sqrt(var + eps) (biased
    variance, eps 1e-5). Returns 1 / sqrt(var + eps)."""
    n = x.shape[0]
    s = x.dtype.type(0.0)
    for k in range(n):
        s += x[k]
    mean = s / n
    s = x.dtype.type(0.0)
    for k in range(n):
        d = x[k] - mean
        s += d * d
    rstd = x.dtype.type(1.0) / math.sqrt(s / n + x.dtype.type(1e-5))
    for k in range(n):
        xn[k] = (x[k] - mean) * rstd
        x[k] = gain[k] * xn[k]
    return rstd


@njit(inline="always", **JIT)
def _layer_norm_backward(dy, xn, rstd, gain, dx):
    """dx = the gradient on LN's input, given dy on its output gain * xn + bias.
    dx may be dy (every sum is taken before dx is written)."""
    n = dy.shape[0]
    s1 = dy.dtype.type(0.0)
    s2 = dy.dtype.type(0.0)
    for k in range(n):
        gd = dy[k] * gain[k]
        s1 += gd
        s2 += gd * xn[k]
    s1 /= n
    s2 /= n
    for k in range(n):
        dx[k] = rstd * (dy[k] * gain[k] - s1 - xn[k] * s2)


@njit(inline="always", **JIT)
def _cell_forward_v(t, b, w, v, ct, m, clip, peep, ln, zone, exact):
    """One sequence's step with the variants; the new cell goes to ct[t, b] (c~_t),
    the carried one to v.c[t + 1, b]."""
    z, r, bias = v.gates[t, b], v.rec[b], v.bias
    c_prev, c_new, tc = v.c[t, b], ct[t, b], v.tanh_c[t, b]
    H = c_new.shape[0]
    if ln:
        v.rstd[t, b, 0] = _layer_norm(z, v.xn_ih[t, b], w.ln_ih_weight)
        v.rstd[t, b, 1] = _layer_norm(r, v.xn_hh[t, b], w.ln_hh_weight)
    if peep:
        for j in range(H):
            r[j] += w.weight_ci[j] * c_prev[j]
            r[H + j] += w.weight_cf[j] * c_prev[j]
    for j in range(2 * H):                               # i, f
        z[j] = _sigmoid(z[j] + r[j] + bias[j], exact)
    for j in range(H):                                   # g
        k = 2 * H + j
        z[k] = _tanh(z[k] + r[k] + bias[k], exact)
    for j in range(H):
        cj = z[H + j] * c_prev[j] + z[j] * z[2 * H + j]
        c_new[j] = clip if cj > clip else (-clip if cj < -clip else cj)
    for j in range(H):                                   # o, which may see the new cell
        k = 3 * H + j
        zo = z[k] + r[k] + bias[k]
        if peep:
            zo += w.weight_co[j] * c_new[j]
        z[k] = _sigmoid(zo, exact)
    if ln:            # tanh(LN_c(c~)), through tc as scratch
        for j in range(H):
            tc[j] = c_new[j]
        v.rstd[t, b, 2] = _layer_norm(tc, v.xn_c[t, b], w.ln_c_weight)
        for j in range(H):
            tc[j] = _tanh(tc[j] + w.ln_c_bias[j], exact)
    else:
        for j in range(H):
            tc[j] = _tanh(c_new[j], exact)
    for j in range(H):
        m[t, b, j] = z[3 * H + j] * tc[j]
    if zone:
        one = c_new.dtype.type(1.0)
        for j in range(H):
            zc = v.zc[t, b, j]
            v.c[t + 1, b, j] = zc * c_prev[j] + (one - zc) * c_new[j]


@njit(inline="always", **JIT)
def _cells_forward_v(t, w, v, ct, m, lengths, clip, peep, ln, zone, exact):
    for b in range(v.gates.shape[1]):
        if t < lengths[b]:
            _cell_forward_v(t, b, w, v, ct, m, clip, peep, ln, zone, exact)
        else:
            v.c[t + 1, b] = v.c[t, b]
            m[t, b] = 0


@njit(inline="always", **JIT)
def transposed_product_pays(itemsize, H, P):
    """Whether lstm_forward runs the recurrent product from a copy of W_hh^T (see there)."""
    return itemsize == 8 or 4 * H * P <= 65536


@njit(**JIT)
def lstm_forward(w, v, m, lengths, clip, peep, ln, zone, rdrop, exact, pack):
    """Forward over the whole sequence.

    w: one direction's parameters (a ``_layout.Params``), v its workspace (a
    ``_layout.Workspace``): x (T, B, I), and h (T+1, B, P), c (T+1, B, H) holding
    h0, c0 in entry 0; entry t+1 receives step t. Writes gates (T, B, 4H)
    activations i, f, g, o, tanh_c (T, B, H) and m (T, B, H), the cell outputs,
    which must be h[1:] when there is neither projection nor zoneout. bias (4H,)
    must hold the sum of the biases. lengths (B,) in [1, T]; clip > 0. pack: the call
    runs on one thread, so the products may run packed (_gemm, single-threaded)
    rather than through BLAS, which may use more.
    """
    x, h, c, gates, rec = v.x, v.h, v.c, v.gates, v.rec
    T, B, I = x.shape
    H = c.shape[2]
    P = h.shape[2]
    w_hh, w_hr = w.weight_hh, w.weight_hr
    plain = not (peep or ln or zone)
    ct = v.ct if zone else c[1:]
    NR = panel_width(x.itemsize)
    packed = pack and (4 * H) % NR == 0
    # All input projections at once: one large GEMM instead of T small ones; packed,
    # it ran 1.1-1.2x faster than OpenBLAS on one thread (3200 or 6400 rows, both dtypes).
    if packed:
        w_in = _uview(v.w_ih_pk.reshape(4 * H * I), 0, (4 * H // NR, I, NR))
        pack_panels_transposed(w.weight_ih, w_in)
        packed_product(x.reshape((T * B, I)), w_in, gates.reshape((T * B, 4 * H)))
    else:
        np.dot(x.reshape((T * B, I)), w.weight_ih.T, out=gates.reshape((T * B, 4 * H)))
    # The recurrent product h (B, P) W_hh^T: from W_hh^T packed once per call into
    # panels (see _gemm) when 4H is a whole number of panels. OpenBLAS repacks W_hh on
    # every call: at (32, 256) x (256, 1024) float32 it ran 1.9x slower than the packed
    # product (1.2x in float64); at B <= 16 they run alike.
    # Otherwise BLAS, from a contiguous copy of W_hh^T ("NN") where that pays: the
    # transposed read ("NT") ran 1.5-3x slower at H = 64, B = 4..16 (both dtypes), 1.05-
    # 1.15x slower in float64 at H = 256..512, and as fast in float32 there.
    nn = not packed and transposed_product_pays(x.itemsize, H, P)
    w_hhT = v.w_hhT
    panels = _uview(w_hhT.reshape(P * 4 * H), 0, (4 * H // NR if packed else 0, P, NR))
    if packed:
        pack_panels_transposed(w_hh, panels)
    elif nn:
        for j in range(4 * H):
            for k in range(P):
                w_hhT[k, j] = w_hh[j, k]
    for t in range(T):
        src = h[t]
        if rdrop:
            for b in range(B):
                for j in range(P):
                    v.hd[t, b, j] = h[t, b, j] * v.rmask[b, j]
            src = v.hd[t]
        if packed:
            packed_product(src, panels, rec)
        elif nn:
            np.dot(src, w_hhT, out=rec)
        else:
            np.dot(src, w_hh.T, out=rec)
        # `exact` becomes a literal in each inlined copy (see the activations).
        if plain:
            if exact:
                _cells_forward(t, gates, rec, v.bias, lengths, clip, c, v.tanh_c, m, True)
            else:
                _cells_forward(t, gates, rec, v.bias, lengths, clip, c, v.tanh_c, m, False)
        elif exact:
            _cells_forward_v(t, w, v, ct, m, lengths, clip, peep, ln, zone, True)
        else:
            _cells_forward_v(t, w, v, ct, m, lengths, clip, peep, ln, zone, False)
        if w_hr.shape[0] > 0:
            np.dot(m[t], w_hr.T, out=h[t + 1])
        if zone:      # h~_t is in h[t + 1] (projected) or m[t]
            one = x.dtype.type(1.0)
            src = h[t + 1] if w_hr.shape[0] > 0 else m[t]
            for b in range(B):
                if t < lengths[b]:
                    for j in range(P):
                        zh = v.zh[t, b, j]
                        h[t + 1, b, j] = zh * h[t, b, j] + (one - zh) * src[b, j]
        for b in range(B):
            if t >= lengths[b]:          # finished: carry the state
                h[t + 1, b] = h[t, b]


@njit(inline="always", **JIT)
def _cell_backward(a, dz, dm, dc, c_prev, c_t, tc, clip):
    """a (4H,) the activations; dm (H,) the gradient on the cell output m_t.
    Writes dz (4H,), the pre-activation gradients; dc (H,) becomes the cell
    gradient for t-1."""
    H = dm.shape[0]
    one = a.dtype.type(1.0)
    zero = a.dtype.type(0.0)
    # Four loops, not one over all seven arrays: each touches at most four arrays, so
    # LLVM's vectorised body needs fewer runtime alias checks and fewer live vector
    # registers. Measured: the backward recurrence of one part of `long` (B=4, H=64,
    # T=1000, float32) took 2.2-2.3 ms instead of 2.4-3.1 ms.
    for j in range(H):                   # dc becomes dc_t, the gradient on c_t
        o = a[3 * H + j]
        dc_t = dc[j] + dm[j] * o * (one - tc[j] * tc[j])
        dc[j] = zero if abs(c_t[j]) >= clip else dc_t    # a clipped cell passes nothing back
    for j in range(H):
        i, f, g = a[j], a[H + j], a[2 * H + j]
        dz[j] = dc[j] * g * i * (one - i)
        dz[H + j] = dc[j] * c_prev[j] * f * (one - f)
        dz[2 * H + j] = dc[j] * i * (one - g * g)
    for j in range(H):
        o = a[3 * H + j]
        dz[3 * H + j] = dm[j] * tc[j] * o * (one - o)
    for j in range(H):                   # dc_{t-1}
        dc[j] *= a[H + j]


@njit(inline="always", **JIT)
def _cell_backward_v(t, s, b, w, dw, v, ct, dm, clip, peep, ln, zone):
    """The general step's backward for one sequence: dm (H,) the gradient on m_t,
    v.dc[b] the one on the carried c_t (on entry; c_{t-1}'s on return). Writes
    dgates[s, b] and, with layer norm, drec[s, b] (s: step t's slot, see
    lstm_backward); adds into the peephole and LN_c gradients."""
    a, dz, dc = v.gates[t, b], v.dgates[s, b], v.dc[b]
    c_prev, c_new, tc = v.c[t, b], ct[t, b], v.tanh_c[t, b]
    H = dm.shape[0]
    one = a.dtype.type(1.0)
    zero = a.dtype.type(0.0)
    if ln:            # du: the gradient on LN_c's input, through LN_c's output
        du = v.du[b]
        xn = v.xn_c[t, b]
        for j in range(H):
            d = dm[j] * a[3 * H + j] * (one - tc[j] * tc[j])
            du[j] = d
            dw.ln_c_weight[j] += d * xn[j]
            dw.ln_c_bias[j] += d
        _layer_norm_backward(du, xn, v.rstd[t, b, 2], w.ln_c_weight, du)
    for j in range(H):
        i, f, g, o = a[j], a[H + j], a[2 * H + j], a[3 * H + j]
        if ln:
            dct = du[j]
        else:
            dct = dm[j] * o * (one - tc[j] * tc[j])
        dzo = dm[j] * tc[j] * o * (one - o)
        keep = zero
        if peep:
            dct += dzo * w.weight_co[j]
            dw.weight_co[j] += dzo * c_new[j]
        if zone:
            zc = v.zc[t, b, j]
            dct += dc[j] * (one - zc)
            keep = dc[j] * zc
        else:
            dct += dc[j]
        dct = zero if abs(c_new[j]) >= clip else dct
        dzi = dct * g * i * (one - i)
        dzf = dct * c_prev[j] * f * (one - f)
        dcp = dct * f + keep
        if peep:
            dcp += dzi * w.weight_ci[j] + dzf * w.weight_cf[j]
            dw.weight_ci[j] += dzi * c_prev[j]
            dw.weight_cf[j] += dzf * c_prev[j]
        dz[j] = dzi
        dz[H + j] = dzf
        dz[2 * H + j] = dct * i * (one - g * g)
        dz[3 * H + j] = dzo
        dc[j] = dcp
    if ln:            # what W_hh h_{t-1} receives, through LN_hh
        _layer_norm_backward(dz, v.xn_hh[t, b], v.rstd[t, b, 1], w.ln_hh_weight, v.drec[s, b])


@njit(inline="always", **JIT)
def _accumulate(acc, src):
    """acc += src, for two arrays of one shape (BLAS's out= would overwrite)."""
    a, s = acc.reshape(acc.size), src.reshape(src.size)
    for k in range(a.size):
        a[k] += s[k]


@njit(inline="always", **JIT)
def _accumulate_transposed(acc, src_t):
    """acc (m, n) += src_t.T for src_t (n, m)."""
    for j in range(acc.shape[0]):
        for k in range(acc.shape[1]):
            acc[j, k] += src_t[k, j]


#: bytes of dZ per chunk of the backward's row-wise products (dx, dW, db), run as soon
#: as the recurrence has made that many steps' dZ, while they are still in L2 (1 MB per
#: core here) instead of over all T*B rows after it. One part of long (B=4, T=1000, H=64,
#: float32) streamed its 4 MB dZ from L3 four times, and two such parts at once ran their
#: backward 1.1x slower than one alone. dZ is then kept for one chunk only (its slots).
CHUNK_BYTES = 1 << 17


@njit(inline="always", **JIT)
def _steps(a, t0, t1):
    """Steps [t0, t1) of a (T, B, n) C-contiguous array as a (rows, n) view."""
    B, n = a.shape[1], a.shape[2]
    return _uview(a.reshape(a.size), t0 * B * n, ((t1 - t0) * B, n))


@njit(inline="always", **JIT)
def _backward_steps(w, dw, v, m, lengths, t0, t1, first, gp, dx_panels, narrow, ln, rdrop,
                    proj):
    """Everything of steps [t0, t1) that does not feed the recurrence, once their dZ
    are made (in slots 0 .. t1 - t0, see lstm_backward): through LN_ih (and the LN
    gains' gradients), dx, and the weight and bias gradients. With gp the weight
    gradients go transposed into dW's scratch buffers (first: overwritten), else they
    are added into dw; db is added into."""
    x, dgates = v.x, v.dgates
    B, I = x.shape[1], x.shape[2]
    H4 = dgates.shape[2]
    P = v.h.shape[2]
    if ln:            # through LN_ih, row by row; and the LN gains' gradients
        for t in range(t0, t1):
            for b in range(B):
                if t < lengths[b]:
                    dz = dgates[t - t0, b]
                    for k in range(H4):
                        dw.ln_ih_weight[k] += dz[k] * v.xn_ih[t, b, k]
                        dw.ln_hh_weight[k] += dz[k] * v.xn_hh[t, b, k]
                    _layer_norm_backward(dz, v.xn_ih[t, b], v.rstd[t, b, 0], w.ln_ih_weight,
                                         v.dxw[t - t0, b])
                else:
                    v.dxw[t - t0, b] = 0
        dgin = _steps(v.dxw, 0, t1 - t0)
        drec = _steps(v.drec, 0, t1 - t0)
    else:
        dgin = drec = _steps(dgates, 0, t1 - t0)
    xs, dxs = _steps(x, t0, t1), _steps(v.dx, t0, t1)
    hin = _steps(v.hd if rdrop else v.h, t0, t1)
    if dx_panels.shape[0] > 0:
        packed_product(dgin, dx_panels, dxs)
    elif narrow:
        narrow_product(dgin, w.weight_ih, dxs)
    else:
        np.dot(dgin, w.weight_ih, out=dxs)
    if gp:
        # dW^T = X^T dZ with dZ's rows read in place (see _gemm.gradient_product):
        # OpenBLAS packed dZ^T for each of the two products, and that copy took as long as
        # its multiply-adds at long's shapes.
        gradient_product(xs, dgin, _uview(v.tmp_ih.reshape(H4 * I), 0, (I, H4)), not first)
        gradient_product(hin, drec, _uview(v.tmp_hh.reshape(H4 * P), 0, (P, H4)), not first)
    else:
        np.dot(dgin.T, xs, out=v.tmp_ih)
        np.dot(drec.T, hin, out=v.tmp_hh)
        _accumulate(dw.weight_ih, v.tmp_ih)
        _accumulate(dw.weight_hh, v.tmp_hh)
    if proj:
        np.dot(_steps(v.dhs, 0, t1 - t0).T, _steps(m, t0, t1), out=v.tmp_hr)
        _accumulate(dw.weight_hr, v.tmp_hr)
    dz2 = _steps(dgates, 0, t1 - t0)
    db = v.db
    for r in range(dz2.shape[0]):
        row = dz2[r]
        for k in range(H4):
            db[k] += row[k]


@njit(**JIT)
def lstm_backward(w, dw, v, m, lengths, clip, peep, ln, zone, rdrop, pack):
    """Backward through time over the sequence ``lstm_forward`` last ran.

    w, v and m as ``lstm_forward`` left them; dw the gradients (a
    ``_layout.Params``), added into. v.dy (T, B, P) the output's gradient; v.dh
    (B, P) and v.dc (B, H) hold dh_n, dc_n on entry and dh0, dc0 on return.
    Writes v.dx (T, B, I); v.db (4H,) receives the bias's gradient (not added into
    dw: the caller adds it to each bias there is). The pre-activation gradients
    (dgates; with layer norm drec, dxw) and the gradient on each h~_t (dhs) of step t
    live in slot t % chunk of their (T, ...) buffers, used only until the chunk's
    products have read them (see CHUNK_BYTES): a window that stays in L2 instead of
    4 MB written out at long size.
    """
    dy, dh, dc, dhs, dgates = v.dy, v.dh, v.dc, v.dhs, v.dgates
    x, h, carry = v.x, v.h, v.carry
    T, B, I = x.shape
    H = v.c.shape[2]
    P = h.shape[2]
    w_hh, w_hr = w.weight_hh, w.weight_hr
    proj = w_hr.shape[0] > 0
    plain = not (peep or ln or zone)
    ct = v.ct if zone else v.c[1:]
    drec = v.drec if ln else dgates      # what the recurrent product's gradient reads
    one = x.dtype.type(1.0)
    # dh = drec_t W_hh from W_hh packed into panels, as the forward's product (see
    # there), when P is a whole number of panels; the forward's packed W_hh^T is no
    # longer needed, so its buffer holds them.
    NR = panel_width(x.itemsize)
    packed = pack and P % NR == 0
    panels = _uview(v.w_hhT.reshape(P * 4 * H), 0, (P // NR if packed else 0, 4 * H, NR))
    if packed:
        pack_panels(w_hh, panels)
    # dx from W_ih's panels where I is a whole number of them; from W_ih itself, one
    # narrow panel, where I is one to three vectors.
    dx_panels = _uview(v.w_ih_pk.reshape(4 * H * I), 0,
                       (I // NR if pack and I % NR == 0 else 0, 4 * H, NR))
    if dx_panels.shape[0] > 0:
        pack_panels(w.weight_ih, dx_panels)
    narrow = pack and narrow_pays(I, x.itemsize)
    # The row-wise products in chunks of steps (see CHUNK_BYTES) where they run on the
    # micro-kernel; through BLAS, over all rows at once, as its calls cost more.
    gp = pack and gradient_product_pays(max(I, P), 4 * H, x.itemsize)
    chunk = max(1, CHUNK_BYTES // (B * 4 * H * x.itemsize)) if gp else T
    v.db[:] = 0
    t_hi = T
    for t in range(T - 1, -1, -1):
        s = t % chunk
        for b in range(B):
            if t < lengths[b]:
                for j in range(P):
                    dhs[s, b, j] = dy[t, b, j] + dh[b, j]
                if zone:        # zoneout's share goes straight to h_{t-1}
                    for j in range(P):
                        zh = v.zh[t, b, j]
                        v.skip[b, j] = dhs[s, b, j] * zh
                        dhs[s, b, j] *= one - zh
            else:        # padding: dy has no effect, the state's gradient passes through
                dhs[s, b] = 0
                carry[b] = dh[b]
        if proj:
            np.dot(dhs[s], w_hr, out=v.dm)
            dm_t = v.dm
        else:
            dm_t = dhs[s]
        for b in range(B):
            if t < lengths[b]:
                if plain:
                    _cell_backward(v.gates[t, b], dgates[s, b], dm_t[b], dc[b], v.c[t, b],
                                   v.c[t + 1, b], v.tanh_c[t, b], clip)
                else:
                    _cell_backward_v(t, s, b, w, dw, v, ct, dm_t[b], clip, peep, ln, zone)
            else:
                dgates[s, b] = 0
                if ln:
                    v.drec[s, b] = 0
        # dh for step t-1 (dh0 after the last iteration).
        if packed:
            packed_product(drec[s], panels, dh)
        else:
            np.dot(drec[s], w_hh, out=dh)
        for b in range(B):
            if t >= lengths[b]:
                dh[b] = carry[b]
            else:
                if rdrop:
                    for j in range(P):
                        dh[b, j] *= v.rmask[b, j]
                if zone:
                    for j in range(P):
                        dh[b, j] += v.skip[b, j]
        if t % chunk == 0:
            _backward_steps(w, dw, v, m, lengths, t, t_hi, t_hi == T, gp, dx_panels, narrow,
                            ln, rdrop, proj)
            t_hi = t

    if gp:            # dW^T, transposed, into dW's scratch buffers over the chunks; then added
        _accumulate_transposed(dw.weight_ih, _uview(v.tmp_ih.reshape(4 * H * I), 0, (I, 4 * H)))
        _accumulate_transposed(dw.weight_hh, _uview(v.tmp_hh.reshape(4 * H * P), 0, (P, 4 * H)))


# --------------------------------------------------------------------------
# Entry points: flat buffers in, named views carved inside
#
# Numba unboxes every array argument on each call (about half a microsecond
# apiece); at small sizes that dominated a forward+backward. So the public layer
# passes flat arrays (one direction of one layer's parameters, gradients and
# workspace) and the sizes, and the views are carved here into named tuples by
# functions compiled from the tables in _layout, the same tables Python carves
# its views and names from.
# --------------------------------------------------------------------------

def _make_view(counted):
    """An intrinsic ``_view(flat, offset, shape)``: flat[offset:offset + prod(shape)]
    .reshape(shape) for a contiguous 1-D flat, written as the array's struct directly
    (Numba's reshape calls a C helper on every view, and carving ~50 views cost ~0.6 us
    per kernel call with it). `counted` False leaves the view without the flat's
    reference count: inside a kernel entry the caller holds the flat alive, and each
    counted view costs an atomic increment and decrement on every slice taken of it
    (hundreds per call). Views that are returned to Python must be counted."""

    @intrinsic
    def _view(typingctx, flat, offset, shape):
        ndim = len(shape)
        retty = types.Array(flat.dtype, ndim, "C")

        def codegen(context, builder, sig, args):
            src = make_array(sig.args[0])(context, builder, args[0])
            out = make_array(retty)(context, builder)
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
                context.get_data_type(flat.dtype)))
            dims = cgutils.unpack_tuple(builder, args[2], ndim)
            strides, acc = [], itemsize
            for d in reversed(dims):             # C order
                strides.insert(0, acc)
                acc = builder.mul(acc, d)
            populate_array(out, data=builder.gep(src.data, [args[1]]),
                           shape=cgutils.pack_array(builder, dims),
                           strides=cgutils.pack_array(builder, strides), itemsize=itemsize,
                           meminfo=src.meminfo if counted else None,
                           parent=src.parent if counted else None)
            if counted:
                return impl_ret_borrowed(context, builder, retty, out._getvalue())
            return out._getvalue()
        return retty(flat, offset, shape), codegen
    return _view


def _compile_carving(fname, table, tuple_cls, dims, counted=False):
    ns = {tuple_cls.__name__: tuple_cls, "_view": _make_view(counted)}
    exec(_layout.carving_source(fname, table, tuple_cls.__name__, dims), ns)
    # Not cached on its own (it has no source file); the cached kernels that
    # inline it carry it in their own cache entries.
    return njit(inline="always", **dict(JIT, cache=False))(ns[fname])


#: a view without a reference count, for use inside kernels (see _make_view)
_uview = _make_view(False)

_carve_params = _compile_carving("_carve_params", _layout.PARAMS, _layout.Params, ("I", "H", "P"))
_carve_workspace = _compile_carving("_carve_workspace", _layout.WORKSPACE, _layout.Workspace,
                                    _layout.DIMS)
# for the views param_views / workspace_views return to Python
_carve_params_counted = _compile_carving("_carve_params", _layout.PARAMS, _layout.Params,
                                         ("I", "H", "P"), counted=True)
_carve_workspace_counted = _compile_carving("_carve_workspace", _layout.WORKSPACE,
                                            _layout.Workspace, _layout.DIMS, counted=True)


@njit(**JIT)
def param_views(p, I, H, P, has_bias, has_proj, has_peephole, has_layer_norm):
    """The kernels' carving of one direction's parameters (a ``_layout.Params``);
    an absent parameter is empty. For tests: Python carves with ``_layout.carve``."""
    return _carve_params_counted(p, I, H, P, has_bias, has_proj, has_peephole, has_layer_norm)


@njit(**JIT)
def workspace_views(ws, T, B, I, H, P, has_layer_norm, has_zoneout, has_rdrop):
    """The kernels' carving of one direction's workspace (a ``_layout.Workspace``)."""
    return _carve_workspace_counted(ws, T, B, I, H, P, has_layer_norm, has_zoneout, has_rdrop)


#: bit k of a kernel call's `opts` is option k: the layout's flags, then four of the call's
#: (zero_state: the initial state, or in backward the final state's gradient, is zero;
#: setting it here saves two NumPy calls per call, a tenth of a seed-size forward;
#: one_thread: the call has one thread, so its products may run packed, see _gemm)
OPTS = _layout.FLAGS + ("padded", "exact", "zero_state", "one_thread")
BIAS, PROJ, PEEPHOLE, LAYER_NORM, ZONEOUT, RDROP, PADDED, EXACT, ZERO_STATE, ONE_THREAD = (
    1 << k for k in range(len(OPTS)))


def opts_bits(**flags):
    """The `opts` integer of a kernel call: opts_bits(bias=True, exact=False, ...)."""
    unknown = set(flags) - set(OPTS)
    if unknown:
        raise ValueError(f"unknown kernel options {sorted(unknown)}; known: {OPTS}")
    return sum(1 << OPTS.index(k) for k, on in flags.items() if on)


def _entry_sigs(n_arrays):
    """(n_arrays flat arrays, lengths, clip, T, B, I, H, P, opts): the options travel as
    the bits of one integer, as each argument costs the dispatcher a type check per call
    (about 0.1 us apiece: at seed size, 8 booleans per call were 5 % of a fwd+bwd)."""
    out = []
    for ft in (types.float32, types.float64):
        arrays = [types.Array(ft, 1, "C")] * n_arrays
        out.append(types.void(*arrays, types.Array(types.int64, 1, "C"), ft,
                              *[types.int64] * 6))
    return out


@njit(_entry_sigs(2), **JIT)
def layer_forward(p, ws, lengths, clip, T, B, I, H, P, opts):
    """``lstm_forward`` on one direction's flat parameters and workspace.

    x, h0, c0 are read from the workspace's x, h[0], c[0] (and the variants'
    masks from zh, zc, rmask); with the ZERO_STATE bit, h[0] and c[0] are zeroed
    here. With the PADDED bit, y receives h_t with the steps past each sequence's
    length zeroed.
    """
    has_bias, has_proj = opts & BIAS != 0, opts & PROJ != 0
    peep, ln, zone, rdrop = (opts & PEEPHOLE != 0, opts & LAYER_NORM != 0, opts & ZONEOUT != 0,
                             opts & RDROP != 0)
    w = _carve_params(p, I, H, P, has_bias, has_proj, peep, ln)
    v = _carve_workspace(ws, T, B, I, H, P, ln, zone, rdrop)
    if opts & ZERO_STATE:
        v.h[0] = 0
        v.c[0] = 0
    for k in range(4 * H):
        v.bias[k] = w.bias_ih[k] + w.bias_hh[k] if has_bias else 0
    if ln:            # LN_ih's and LN_hh's biases add to the gates' bias
        for k in range(4 * H):
            v.bias[k] += w.ln_ih_bias[k] + w.ln_hh_bias[k]
    m = v.m if has_proj or zone else v.h[1:]
    lstm_forward(w, v, m, lengths, clip, peep, ln, zone, rdrop, opts & EXACT != 0,
                 opts & ONE_THREAD != 0)
    if opts & PADDED:
        for t in range(T):
            for b in range(B):
                if t < lengths[b]:
                    v.y[t, b] = v.h[t + 1, b]
                else:
                    v.y[t, b] = 0


@njit(_entry_sigs(3), **JIT)
def layer_backward(p, g, ws, lengths, clip, T, B, I, H, P, opts):
    """``lstm_backward`` on one direction's flat buffers; dy, dh_n, dc_n are read
    from the workspace's dy, dh, dc (zeroed here with the ZERO_STATE bit), and the
    gradients are added into g."""
    has_bias, has_proj = opts & BIAS != 0, opts & PROJ != 0
    peep, ln, zone, rdrop = (opts & PEEPHOLE != 0, opts & LAYER_NORM != 0, opts & ZONEOUT != 0,
                             opts & RDROP != 0)
    w = _carve_params(p, I, H, P, has_bias, has_proj, peep, ln)
    dw = _carve_params(g, I, H, P, has_bias, has_proj, peep, ln)
    v = _carve_workspace(ws, T, B, I, H, P, ln, zone, rdrop)
    if opts & ZERO_STATE:
        v.dh[:] = 0
        v.dc[:] = 0
    m = v.m if has_proj or zone else v.h[1:]
    lstm_backward(w, dw, v, m, lengths, clip, peep, ln, zone, rdrop, opts & ONE_THREAD != 0)
    if has_bias:
        _accumulate(dw.bias_ih, v.db)
        _accumulate(dw.bias_hh, v.db)
    if ln:
        _accumulate(dw.ln_ih_bias, v.db)
        _accumulate(dw.ln_hh_bias, v.db)


def _rows_sigs(n_flat, n_io):
    """(n_flat flat arrays, n_io (T, *, n) arrays, of which the first may have any
    strides (the caller's x or dy), b0, then _entry_sigs' lengths ... opts)."""
    out = []
    for ft in (types.float32, types.float64):
        flat = [types.Array(ft, 1, "C")] * n_flat
        io = [types.Array(ft, 3, "A")] + [types.Array(ft, 3, "C")] * (n_io - 1)
        out.append(types.void(*flat, *io, types.int64, types.Array(types.int64, 1, "C"), ft,
                              *[types.int64] * 6))
    return out


# One part of a split batch (see _threads) as one call, the copies of its rows in and out
# included: the part then runs without the GIL from start to end, and the other
# thread's part does not wait on this one's Python (measured at small size, float32: the
# Python around the two parts' kernels took 150 us of a 700 us forward).

@njit(inline="always", **JIT)
def _copy_rows(src, s0, dst, d0, B):
    """dst[:, d0:d0 + B] = src[:, s0:s0 + B] for (T, *, n) arrays. Written out to the
    element: with a row assignment per (t, b), rows_forward of one part of long (4000
    rows in, 4000 out) ran 0.3 ms longer than layer_forward on the same workspace (3.0
    against 2.7 ms); written out, 0.18 ms."""
    for t in range(src.shape[0]):
        for b in range(B):
            for j in range(src.shape[2]):
                dst[t, d0 + b, j] = src[t, s0 + b, j]


@njit(inline="always", **JIT)
def _forward_rows_out(v, y, h_n, c_n, b0):
    """A part's outputs into rows [b0, b0 + B) of the whole batch's y, h_n, c_n."""
    T, B = v.x.shape[:2]
    _copy_rows(v.h[1:], 0, y, b0, B)
    _copy_rows(v.h[T:], 0, h_n, b0, B)
    _copy_rows(v.c[T:], 0, c_n, b0, B)


@njit(inline="always", **JIT)
def _backward_rows_out(v, dx, dh0, dc0, b0):
    """A part's input gradients into rows [b0, b0 + B) of the whole batch's dx, dh0, dc0."""
    B = v.x.shape[1]
    _copy_rows(v.dx, 0, dx, b0, B)
    for b in range(B):
        for j in range(v.dh.shape[1]):
            dh0[0, b0 + b, j] = v.dh[b, j]
        for j in range(v.dc.shape[1]):
            dc0[0, b0 + b, j] = v.dc[b, j]


@njit(_rows_sigs(2, 4), **JIT)
def rows_forward(p, ws, x, y, h_n, c_n, b0, lengths, clip, T, B, I, H, P, opts):
    """``layer_forward`` on rows [b0, b0 + B) of x (T, *, I), writing those rows of
    y (T, *, P), h_n (1, *, P) and c_n (1, *, H). One layer, one direction, full lengths
    (no padding), no variant masks."""
    v = _carve_workspace(ws, T, B, I, H, P, opts & LAYER_NORM != 0, opts & ZONEOUT != 0,
                         opts & RDROP != 0)
    _copy_rows(x, b0, v.x, 0, B)
    layer_forward(p, ws, lengths, clip, T, B, I, H, P, opts)
    _forward_rows_out(v, y, h_n, c_n, b0)


@njit(_rows_sigs(3, 4), **JIT)
def rows_backward(p, g, ws, dy, dx, dh0, dc0, b0, lengths, clip, T, B, I, H, P, opts):
    """``layer_backward`` after ``rows_forward``: reads rows [b0, b0 + B) of dy (T, *, P),
    writes those of dx (T, *, I), dh0 (1, *, P) and dc0 (1, *, H); the gradients are
    added into g."""
    v = _carve_workspace(ws, T, B, I, H, P, opts & LAYER_NORM != 0, opts & ZONEOUT != 0,
                         opts & RDROP != 0)
    _copy_rows(dy, b0, v.dy, 0, B)
    layer_backward(p, g, ws, lengths, clip, T, B, I, H, P, opts)
    _backward_rows_out(v, dx, dh0, dc0, b0)


def _serve_sigs():
    out = []
    for ft in (types.float32, types.float64):
        flat, io = types.Array(ft, 1, "C"), types.Array(ft, 3, "C")
        out.append(types.void(types.Array(types.int64, 1, "C"), types.int64, types.int64,
                              *[flat] * 3,
                              *[io] * 6, types.int64, types.Array(types.int64, 1, "C"), ft,
                              *[types.int64] * 6))
    return out


@njit(_serve_sigs(), **JIT)
def serve_rows(cell, spins, me, p, g, ws, y, h_n, c_n, dx, dh0, dc0, b0, lengths, clip,
               T, B, I, H, P, opts):
    """A worker thread's side of a split plan (see _threads.Server): runs the commands
    posted in cell for job `me` on rows [b0, b0 + B); returns, leaving it, at a command
    for another job, or when none came in `spins` reads. FORWARD: ``layer_forward`` on
    x already in the workspace, its rows of y, h_n, c_n written as ``rows_forward``
    does. BACKWARD: g zeroed, then ``layer_backward`` on dy already in the workspace,
    and its rows of dx, dh0, dc0 written."""
    v = _carve_workspace(ws, T, B, I, H, P, opts & LAYER_NORM != 0, opts & ZONEOUT != 0,
                         opts & RDROP != 0)
    done = load_acquire(cell, DONE)
    while True:
        seq = spin_while_equal(cell, SEQ, done, spins)
        if seq == done or load_acquire(cell, JOB) != me:
            return
        cmd = load_acquire(cell, CMD)
        if cmd == FORWARD:
            layer_forward(p, ws, lengths, clip, T, B, I, H, P, opts)
            _forward_rows_out(v, y, h_n, c_n, b0)
        elif cmd == BACKWARD:
            g[:] = 0
            layer_backward(p, g, ws, lengths, clip, T, B, I, H, P, opts)
            _backward_rows_out(v, dx, dh0, dc0, b0)
        done = seq
        store_release(cell, DONE, seq)


@njit(["void(float32[:, :, :], float32[:, :, :], int64[::1])",
       "void(float64[:, :, :], float64[:, :, :], int64[::1])"], **JIT)
def reverse_in_time(src, dst, lengths):
    """dst[s, b] = src[lengths[b] - 1 - s, b] for s < lengths[b], else 0: each
    sequence's own steps, last first (the reverse direction's view of time)."""
    T, B = dst.shape[0], dst.shape[1]
    for s in range(T):
        for b in range(B):
            if s < lengths[b]:
                dst[s, b] = src[lengths[b] - 1 - s, b]
            else:
                dst[s, b] = 0


@njit(["void(float32[:, :, ::1], int64[::1])", "void(float64[:, :, ::1], int64[::1])"], **JIT)
def zero_padding(a, lengths):
    """a[t, b] = 0 for t >= lengths[b]: padded input steps must not leak into the
    weight gradients (0 * NaN is NaN)."""
    for t in range(a.shape[0]):
        for b in range(a.shape[1]):
            if t >= lengths[b]:
                a[t, b] = 0
