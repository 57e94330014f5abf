"""Through time: one direction of one layer's forward and backward over a whole sequence.

The same maths as :mod:`fastlstm.reference` (its docstring carries the
equations), arranged the way fast LSTMs (cuDNN, oneDNN) arrange it:

* forward: the input projection of all T steps is one GEMM before the
  recurrence; each step is one small GEMM ``h_{t-1} W_hh^T`` plus one fused
  elementwise pass over the gates (``_cell``);
* backward: each step is one fused elementwise pass plus one GEMM
  ``dz W_hh``; dx, dW_ih, dW_hh and db, which do not feed the recurrence, are
  GEMMs over many rows, run in chunks of steps as soon as the recurrence has made
  their dz (see CHUNK_BYTES), or over all T*B rows after it where BLAS runs them.

Every kernel writes into buffers its caller allocated and returns nothing, so
nothing is allocated per step. Gate pre-activations and activations are kept
as (T, B, 4H): for one sequence the H values of one gate are contiguous, so the
elementwise loops vectorise.
"""
import numpy as np
from numba import njit
from numba.extending import register_jitable

from . import _activations, _cell, _gemm, _numba_ext
from ._cell import (
    _cell_backward,
    _cell_backward_v,
    _cells_forward,
    _cells_forward_v,
    _layer_norm_backward,
)
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
from ._numba_ext import make_view

# the loops inline the cell, the activations and the packed products
follow(__file__, _activations.__file__, _cell.__file__, _gemm.__file__, _numba_ext.__file__)

__all__ = ["lstm_forward", "lstm_backward", "transposed_product_pays", "CHUNK_BYTES",
           "BLAS_CHUNK_ROWS", "backward_chunk"]

#: a view without a reference count, for use inside kernels (see _numba_ext.make_view)
_uview = make_view(False)

@njit(inline="always", **JIT)
def transposed_product_pays(itemsize, H, P):
    """Whether lstm_forward runs the recurrent product from a copy of W_hh^T (see there)."""
    return itemsize == 8 or 4 * H * P <= 65536


@njit(**JIT)
def lstm_forward(w, v, m, lengths, clip, peep, ln, zone, rdrop, exact, pack, prepacked):
    """Forward over the whole sequence.

    w: one direction's parameters (a ``_layout.Params``), v its workspace (a
    ``_layout.Workspace``): x (T, B, I), and h (T+1, B, P), c (T+1, B, H) holding
    h0, c0 in entry 0; entry t+1 receives step t. Writes gates (T, B, 4H)
    activations i, f, g, o, tanh_c (T, B, H) and m (T, B, H), the cell outputs,
    which must be h[1:] when there is neither projection nor zoneout. bias (4H,)
    must hold the sum of the biases. lengths (B,) in [1, T]; clip > 0. pack: the call
    runs on one thread, so the products may run packed (_gemm, single-threaded)
    rather than through BLAS, which may use more. prepacked: the workspace's copies of
    the weights (panels, W_hh^T) are current (an earlier segment of this pass made them):
    at medium size packing them took a fifth of a 10-step segment's forward.
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
        if not prepacked:
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
    if prepacked:
        pass
    elif packed:
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
#: rows (steps x sequences) per chunk through BLAS, whose dW products are added into dW
#: from a scratch buffer once per chunk (np.dot has no beta): at large (B=128, H=512,
#: float64) chunks of 4 MB (2 steps) made that addition 5-9 % of a fwd+bwd. The chunks
#: cut the sums of the weight gradients at fixed steps, whatever T, so that a backward
#: run segment by segment (recompute, see _parts) adds them in the same order as one
#: over all T.
BLAS_CHUNK_ROWS = 4096


@register_jitable
def backward_chunk(B, I, H, P, itemsize, pack):
    """Steps per chunk of lstm_backward's row-wise products (its chunks start at the
    multiples of this), a function of the sizes but not of T. Plain Python when Python
    calls it: a segment of a recomputed backward is a whole number of chunks."""
    if pack and gradient_product_pays(max(I, P), 4 * H, itemsize):
        return max(1, CHUNK_BYTES // (B * 4 * H * itemsize))
    return max(1, BLAS_CHUNK_ROWS // B)


@njit(inline="always", **JIT)
def _steps(a, t0, t1):
    """Steps [t0, t1) of a (T, B, n) C-contiguous array as a (rows, n) view."""
    B, n = a.shape[1], a.shape[2]
    return _uview(a.reshape(a.size), t0 * B * n, ((t1 - t0) * B, n))


@njit(inline="always", **JIT)
def _backward_steps(w, dw, v, m, lengths, t0, t1, first, gp, dx_panels, narrow, ln, rdrop,
                    proj, want_dx):
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
    if not want_dx:
        pass
    elif dx_panels.shape[0] > 0:
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
def lstm_backward(w, dw, v, m, lengths, clip, peep, ln, zone, rdrop, pack, later, earlier,
                  prepacked, want_dx=True):
    """Backward through time over the sequence ``lstm_forward`` last ran.

    w, v and m as ``lstm_forward`` left them; dw the gradients (a
    ``_layout.Params``), added into. v.dy (T, B, P) the output's gradient; v.dh
    (B, P) and v.dc (B, H) hold dh_n, dc_n on entry and dh0, dc0 on return.
    Writes v.dx (T, B, I) (unless not want_dx); v.db (4H,) receives the bias's gradient
    (not added into dw: the caller adds it to each bias there is). The pre-activation gradients
    (dgates; with layer norm drec, dxw) and the gradient on each h~_t (dhs) of step t
    live in slot t % chunk of their (T, ...) buffers, used only until the chunk's
    products have read them (see CHUNK_BYTES): a window that stays in L2 instead of
    4 MB written out at long size.

    later / earlier: the call is one segment of a longer sequence (see _parts), whose
    later steps an earlier call differentiated (add to the sums it began: db and dW^T's
    scratch) / whose earlier steps a later call will (leave the sums for it to finish).
    Its first step must start a chunk (backward_chunk). With recompute's workspace rows
    its panels have buffers of their own (w_hh_bk, w_ih_bk); prepacked: they are current.
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
    own = v.w_hh_bk.shape[0] > 0
    hh_bk = v.w_hh_bk if own else v.w_hhT
    ih_bk = v.w_ih_bk if own else v.w_ih_pk
    panels = _uview(hh_bk.reshape(P * 4 * H), 0, (P // NR if packed else 0, 4 * H, NR))
    if packed and not prepacked:
        pack_panels(w_hh, panels)
    # dx from W_ih's panels where I is a whole number of them; from W_ih itself, one
    # narrow panel, where I is one to three vectors.
    dx_panels = _uview(ih_bk.reshape(4 * H * I), 0,
                       (I // NR if pack and want_dx and I % NR == 0 else 0, 4 * H, NR))
    if dx_panels.shape[0] > 0 and not prepacked:
        pack_panels(w.weight_ih, dx_panels)
    narrow = pack and narrow_pays(I, x.itemsize)
    # The row-wise products in chunks of steps (see CHUNK_BYTES), larger through BLAS.
    gp = pack and gradient_product_pays(max(I, P), 4 * H, x.itemsize)
    chunk = backward_chunk(B, I, H, P, x.itemsize, pack)
    if not later:
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
            _backward_steps(w, dw, v, m, lengths, t, t_hi, t_hi == T and not later, gp,
                            dx_panels, narrow, ln, rdrop, proj, want_dx)
            t_hi = t

    # dW^T, transposed, into dW's scratch buffers over the chunks (of every segment); then added
    if gp and not earlier:
        _accumulate_transposed(dw.weight_ih, _uview(v.tmp_ih.reshape(4 * H * I), 0, (I, 4 * H)))
        _accumulate_transposed(dw.weight_hh, _uview(v.tmp_hh.reshape(4 * H * P), 0, (P, 4 * H)))
