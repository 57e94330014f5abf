"""Column split for training: a forward that keeps what its backward reads, and that backward.

``_columns`` says why a step's recurrent product, at a small batch and a large H, wants
its weights split by hidden units over the cores rather than its batch: a batch split
makes every core read all of W_hh every step, forward and backward. Here thread k of n
owns the units [j0, j1) (hk of them) of one layer, one direction, no projection, no
variant but the cell clip, full lengths:

* forward: its rows of W_ih, W_hh and the biases (gate order i, f, g, o, each hk rows)
  copied out contiguous; its gates' input projection over all steps (one GEMM); per
  step, h_{t-1} (all H) times its packed rows of W_hh^T, its units' cell, its units of
  h_t into the shared h; one barrier a step. It keeps its gates' activations and its
  units' cells, as ``_recurrence.lstm_forward`` keeps all of them.
* backward: per step, its units' dz_t from dy, dh and dc (``_cell._cell_backward``), then
  dz_t's contribution to dh_{t-1} over all H units from its rows of W_hh (a partial
  sum, written to a slot of its own); one barrier; its units of dh_{t-1} summed over
  the threads' partials in thread order. After the steps its rows of dW_ih, dW_hh and
  db over all T B rows at once (no other thread writes them: nothing to sum after),
  and dx's share of its gates, summed over the threads by rows after one more barrier.

Every sum runs in the same order whatever the threads' timing, so a call is bitwise
repeatable for a given thread count.
"""
import numpy as np
from numba import njit, types

from . import _activations, _cell, _columns, _gemm, _numba_ext, _spin
from ._cell import _cell_backward, _gates_forward, _state_forward
from ._columns import SYNC_STRIDE, _barrier
from ._compile import entry
from ._config import JIT, follow
from ._gemm import pack_panels, pack_panels_transposed, packed_product
from ._numba_ext import flush_denormals, restore_fp
from ._spin import (
    BACKWARD,
    CMD,
    DONE,
    FORWARD,
    JOB,
    SEQ,
    entered,
    load_acquire,
    spin_while_equal,
    store_release,
)

follow(__file__, _activations.__file__, _cell.__file__, _columns.__file__, _gemm.__file__,
       _numba_ext.__file__, _spin.__file__)

__all__ = ["columns_train", "serve_columns_train", "TRAIN_META"]

#: a call's meta array (int64)
TRAIN_META = ("T", "B", "I", "H", "k", "n", "j0", "j1", "opts")


@njit(inline="always", **JIT)
def _own_rows(p, o, H, K, j0, hk, dst):
    """dst (4 hk, K) <- rows g H + j0 + r (g = 0..3, r < hk) of the (4H, K) matrix at p[o]."""
    for g in range(4):
        for r in range(hk):
            at = o + (g * H + j0 + r) * K
            row = dst[g * hk + r]
            for q in range(K):
                row[q] = p[at + q]


@njit(inline="always", **JIT)
def _add_own_rows(g, o, H, K, j0, hk, src):
    """Rows g H + j0 + r of the (4H, K) gradient at g[o] += src (4 hk, K)."""
    for gate in range(4):
        for r in range(hk):
            at = o + (gate * H + j0 + r) * K
            row = src[gate * hk + r]
            for q in range(K):
                g[at + q] += row[q]


@njit(inline="always", **JIT)
def _train_forward(p, x, h, c_n, acts, c, tc, w_ih, w_hh, bias, pf, rec, sync, meta, clip,
                   exact):
    T, B, I, H = meta[0], meta[1], meta[2], meta[3]
    k, n, j0, j1, opts = meta[4], meta[5], meta[6], meta[7], meta[8]
    hk = j1 - j0
    o_hh = 4 * H * I
    o_b = o_hh + 4 * H * H          # bias_ih, then bias_hh (PARAMS' order)
    _own_rows(p, 0, H, I, j0, hk, w_ih)
    _own_rows(p, o_hh, H, H, j0, hk, w_hh)
    for gate in range(4):
        for r in range(hk):
            j = gate * H + j0 + r
            bias[gate * hk + r] = p[o_b + j] + p[o_b + 4 * H + j] if opts & 2 else 0
    pack_panels_transposed(w_hh, pf)
    np.dot(x.reshape((T * B, I)), w_ih.T, out=acts.reshape((T * B, 4 * hk)))
    step = sync[n * SYNC_STRIDE]
    for t in range(T):
        packed_product(h[t], pf, rec)
        for b in range(B):
            z = acts[t, b]
            _gates_forward(z, rec[b], bias, exact)
            _state_forward(z, c[t, b], c[t + 1, b], tc[t, b], h[t + 1, b, j0:j1], clip, exact)
        step += 1
        _barrier(sync, k, n, step)
    for b in range(B):
        for r in range(hk):
            c_n[0, b, j0 + r] = c[T, b, r]


@njit(inline="always", **JIT)
def _train_backward(p, g, x, h, dy, dx, dh0, dc0, dh_n, dc_n, acts, c, tc, w_ih, w_hh, pb,
                    dz, dh, dc, dm, part, dxp, tmp_ih, tmp_hh, sync, meta, clip):
    T, B, I, H = meta[0], meta[1], meta[2], meta[3]
    k, n, j0, j1, opts = meta[4], meta[5], meta[6], meta[7], meta[8]
    hk = j1 - j0
    o_hh = 4 * H * I
    o_b = o_hh + 4 * H * H
    pack_panels(w_hh, pb)           # its rows of W_hh (4 hk, H) as the product's B
    for b in range(B):
        for r in range(hk):
            dh[b, r] = dh_n[0, b, j0 + r]
            dc[b, r] = dc_n[0, b, j0 + r]
    step = sync[n * SYNC_STRIDE]
    for t in range(T - 1, -1, -1):
        for b in range(B):
            dmb, dhb, dyb = dm[b], dh[b], dy[t, b]
            for r in range(hk):
                dmb[r] = dyb[j0 + r] + dhb[r]
            _cell_backward(acts[t, b], dz[t, b], dmb, dc[b], c[t, b], c[t + 1, b], tc[t, b],
                           clip)
        # two slots: a thread writes slot t % 2 only after every thread has passed the
        # barrier of step t + 1, which each reaches after reading slot (t + 1) % 2
        mine = part[t % 2, k]
        packed_product(dz[t], pb, mine)
        step += 1
        _barrier(sync, k, n, step)
        for b in range(B):
            dhb = dh[b]
            for r in range(hk):
                dhb[r] = part[t % 2, 0, b, j0 + r]
            for other in range(1, n):
                src = part[t % 2, other, b]
                for r in range(hk):
                    dhb[r] += src[j0 + r]
    for b in range(B):
        for r in range(hk):
            dh0[0, b, j0 + r] = dh[b, r]
            dc0[0, b, j0 + r] = dc[b, r]
    TB = T * B
    dz2 = dz.reshape((TB, 4 * hk))
    np.dot(dz2.T, x.reshape((TB, I)), out=tmp_ih)
    _add_own_rows(g, 0, H, I, j0, hk, tmp_ih)
    np.dot(dz2.T, h[:T].reshape((TB, H)), out=tmp_hh)
    _add_own_rows(g, o_hh, H, H, j0, hk, tmp_hh)
    if opts & 2:
        # tmp_hh is free again: its first 4 hk values hold db (a column of it, with a
        # stride, took 1.6 of a thread's 16 ms backward at H = 512, B = 16, T = 25)
        db = tmp_hh.reshape(tmp_hh.size)[:4 * hk]
        db[:] = 0
        for row in range(TB):
            zr = dz2[row]
            for q in range(4 * hk):
                db[q] += zr[q]
        for gate in range(4):
            for r in range(hk):
                j = gate * H + j0 + r
                g[o_b + j] += db[gate * hk + r]
                g[o_b + 4 * H + j] += db[gate * hk + r]
    np.dot(dz2, w_ih, out=dxp[k])
    step += 1
    _barrier(sync, k, n, step)
    dx2 = dx.reshape((TB, I))
    for row in range(k * TB // n, (k + 1) * TB // n):
        out = dx2[row]
        src = dxp[0, row]
        for q in range(I):
            out[q] = src[q]
        for other in range(1, n):
            src = dxp[other, row]
            for q in range(I):
                out[q] += src[q]


@njit(**JIT)     # not inlined: the two entries share its one compile
def _run(cmd, a):
    """The command on the buffers of tuple a (a call of more than 30 arguments compiles
    to CALL_FUNCTION_EX, which Numba does not inline)."""
    (p, g, x, h, dy, dx, c_n, dh0, dc0, dh_n, dc_n, acts, c, tc, w_ih, w_hh, bias, pf, pb, rec,
     dz, dh, dc, dm, part, dxp, tmp_ih, tmp_hh, sync, meta, clip) = a
    fp = flush_denormals()
    if cmd == FORWARD:
        if meta[8] & 1:             # exact: a literal in each inlined copy (see _activations)
            _train_forward(p, x, h, c_n, acts, c, tc, w_ih, w_hh, bias, pf, rec, sync, meta,
                           clip, True)
        else:
            _train_forward(p, x, h, c_n, acts, c, tc, w_ih, w_hh, bias, pf, rec, sync, meta,
                           clip, False)
    else:
        _train_backward(p, g, x, h, dy, dx, dh0, dc0, dh_n, dc_n, acts, c, tc, w_ih, w_hh, pb,
                        dz, dh, dc, dm, part, dxp, tmp_ih, tmp_hh, sync, meta, clip)
    restore_fp(fp)


def _sigs(serve):
    out = []
    for ft in (types.float32, types.float64):
        a1, a2, a3, a4 = (types.Array(ft, d, "C") for d in (1, 2, 3, 4))
        i64 = types.Array(types.int64, 1, "C")
        head = (i64, types.int64, types.int64) if serve else (types.int64,)
        out.append(types.void(*head, a1, a1, a3, a3, a3, a3, a3, a3, a3, a3, a3, a3, a3, a3,
                              a2, a2, a1, a3, a3, a2, a3, a2, a2, a2, a4, a3, a2, a2, i64,
                              i64, ft))
    return out


@entry(_sigs(False))
def columns_train(cmd, p, g, x, h, dy, dx, c_n, dh0, dc0, dh_n, dc_n, acts, c, tc, w_ih, w_hh,
                  bias, pf, pb, rec, dz, dh, dc, dm, part, dxp, tmp_ih, tmp_hh, sync, meta,
                  clip):
    """Thread k's share of a column-split training forward (cmd FORWARD) or of its
    backward (BACKWARD), see the module; the gradients are added into g."""
    _run(cmd, (p, g, x, h, dy, dx, c_n, dh0, dc0, dh_n, dc_n, acts, c, tc, w_ih, w_hh, bias,
               pf, pb, rec, dz, dh, dc, dm, part, dxp, tmp_ih, tmp_hh, sync, meta, clip))


@entry(_sigs(True))
def serve_columns_train(cell, spins, me, p, g, x, h, dy, dx, c_n, dh0, dc0, dh_n,
                        dc_n, acts, c, tc, w_ih, w_hh, bias, pf, pb, rec, dz, dh, dc, dm, part,
                        dxp, tmp_ih, tmp_hh, sync, meta, clip):
    """A server thread's side (see _servers.Server): FORWARD or BACKWARD runs its share;
    returns at a command for another job or after `spins` idle reads."""
    entered(cell)
    done = load_acquire(cell, DONE)
    while True:
        seq = spin_while_equal(cell, SEQ, done, spins)
        if seq == done or load_acquire(cell, JOB) != me:
            return
        cmd = load_acquire(cell, CMD)
        if cmd == FORWARD or cmd == BACKWARD:
            _run(cmd, (p, g, x, h, dy, dx, c_n, dh0, dc0, dh_n, dc_n, acts, c, tc, w_ih, w_hh,
                       bias, pf, pb, rec, dz, dh, dc, dm, part, dxp, tmp_ih, tmp_hh, sync,
                       meta, clip))
        done = seq
        store_release(cell, DONE, seq)
