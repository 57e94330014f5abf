"""One step of the LSTM cell, forward and backward, for every sequence of a batch.

The elementwise half of a step (the products are ``_recurrence``'s): the plain cell's
loops, the fast path, and the general cell with the variants. Everything here is
inlined (``inline="always"``) into the through-time loops.
"""
import math

from numba import njit

from ._activations import _sigmoid, _tanh
from ._config import JIT

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
    # each run of gates a slice of its own, indexed from 0: indexed as z[2 * H + j]
    # (which _state_forward's one loop takes well) these three loops and the state took
    # 520 against 190 ns at B = 1, H = 64, float32
    zs, rs, bs = z[:2 * H], r[:2 * H], bias[:2 * H]
    for j in range(2 * H):                               # i, f
        zs[j] = _sigmoid(zs[j] + rs[j] + bs[j], exact)
    zg, rg, bg = z[2 * H:3 * H], r[2 * H:3 * H], bias[2 * H:3 * H]
    for j in range(H):                                   # g
        zg[j] = _tanh(zg[j] + rg[j] + bg[j], exact)
    zo, ro, bo = z[3 * H:], r[3 * H:], bias[3 * H:]
    for j in range(H):                                   # o
        zo[j] = _sigmoid(zo[j] + ro[j] + bo[j], exact)


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
