"""Column split: every core on one small batch, each owning a slice of the hidden units.

With B small and H large a step's product h_{t-1} W_hh^T reads all of W_hh (4H x H) to
do B multiply-adds per weight: it is bound by how fast the weights stream in, not by the
FMA units. A batch split (``_threads``) makes every core read all of W_hh for its rows,
and at B = 1 leaves one core idle. Here thread k of n owns the hidden units [j0, j1): the
rows of W_ih and W_hh (and of the bias) of its units' four gates, its units' cell state,
and its units' columns of h. It reads only its share of the weights; the threads meet
once per step (``_barrier``), when every slice of h_t is written, because each needs all
of h_t for step t + 1.

Evaluation forward only (no per-step state kept), one direction, no projection and no
variant but the cell clip, any number of layers in one call: whole sequences
(``Inference.forward``, an evaluation forward of ``LSTM``) and a stream's step (T = 1).
The weights are read where they lie (the model's flat parameters, in their
``_layout.PARAMS`` places) or from a bfloat16 copy in the same places (uint16 bit
patterns, widened to float32 as they are read: half the traffic).

Every thread's result is computed in the same order whatever the other threads do, so
a call is bitwise repeatable for a given thread count.
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from . import _activations, _gemm, _numba_ext, _spin
from ._activations import _sigmoid, _tanh
from ._compile import entry
from ._config import JIT, follow
from ._gemm import packed_product, panel_width, row_dots
from ._numba_ext import (
    flush_denormals,
    intrinsic,
    make_view,
    restore_fp,
)
from ._spin import (
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

follow(__file__, _activations.__file__, _gemm.__file__, _numba_ext.__file__, _spin.__file__)

#: a view without a reference count, for use inside kernels (see _numba_ext.make_view)
_uview = make_view(False)

__all__ = ["columns_forward", "serve_columns", "columns_forward_bf16", "serve_columns_bf16",
           "META", "PACKED", "PANELS", "SYNC_STRIDE", "to_bfloat16", "from_bfloat16", "unit_ranges"]

#: int64 slots between two threads' barrier counters: each on its own 128-byte line pair
#: (the adjacent-line prefetcher pulls lines in pairs), so that one thread's store does
#: not take the line another spins on
SYNC_STRIDE = 16

#: a call's meta array (int64): these sizes, then the layers' parameter offsets (L + 1)
META = ("T", "B", "I", "H", "L", "k", "n", "j0", "j1", "opts")
#: bits of meta's opts (beside 1: exact activations, 2: biases): the recurrent products
#: run from packed panels (see _columns_forward); the panels hold every layer's rows
#: already (packed by an earlier call on the same weights)
PANELS, PACKED = 4, 8


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the uint32 `bits`."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


def widen(w):
    """A weight as the float the kernels compute in: itself, or a bfloat16 bit pattern
    (uint16) as float32 (its 16 bits are a float32's upper half)."""


@overload(widen, inline="always")
def _widen(w):
    if isinstance(w, types.Float):
        return lambda w: w
    if w == types.uint16:
        return lambda w: _f32_from_bits(np.uint32(w) << np.uint32(16))
    return None


def to_bfloat16(a):
    """float32 array -> its bfloat16 bit patterns (uint16), rounded to nearest even; NaN
    stays NaN (its payload's top bits kept, quiet bit set)."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(nan, (bits >> 16) | 0x0040, rounded).astype(np.uint16)


def from_bfloat16(u):
    """bfloat16 bit patterns (uint16) -> float32."""
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


def unit_ranges(H, n, itemsize):
    """Thread k's hidden units [j0, j1) for k < n: as equal as whole cache lines allow (a
    line of h written by two threads would bounce between their cores every step)."""
    line = max(64 // itemsize, 1)
    cuts = [min(H, (k * H // n + line // 2) // line * line) for k in range(n)] + [H]
    cuts[0] = 0
    return [(cuts[k], cuts[k + 1]) for k in range(n)]


@njit(inline="always", **JIT)
def _barrier(sync, k, n, target):
    """Publish that this thread reached `target`, then wait until all n have."""
    store_release(sync, k * SYNC_STRIDE, target)
    for other in range(n):
        while load_acquire(sync, other * SYNC_STRIDE) < target:
            pass


@njit(inline="always", **JIT)
def _recurrent_rows(w, o, H, P, j0, hk, hp, rec):
    """rec[g, b, r] = hp[b] . W[g H + j0 + r] for this thread's rows of a weight matrix
    of P columns at w[o] (W_hh, or W_ih for a stream's step): _gemm.row_dots, float or
    bfloat16 weights. Its SIMD sums beat Numba's loops over the same rows (2 rows x 4
    sequences, eight scalar sums vectorised by LLVM), float32, H = 256 rows of K = 256,
    one thread: 1 MB of rows at B = 1 12.1 against 15.0 us, 2 MB 29.3 against 37.9; at B
    = 2 13.8 against 21.5; at B = 4 23.9 against 25.6; bfloat16 ran at half float32's
    speed in those loops (widened element by element)."""
    for g in range(4):
        row_dots(w, o + (g * H + j0) * P, P, hk, hp, rec[g])


def weight_rows(w, at, rows, I, wide):
    """rows x I weights starting at w[at], as a float matrix: a view of float weights,
    bfloat16 ones widened into `wide`."""


@overload(weight_rows, inline="always")
def _weight_rows(w, at, rows, I, wide):
    if isinstance(w.dtype, types.Float):
        return lambda w, at, rows, I, wide: w[at:at + rows * I].reshape((rows, I))

    def widened(w, at, rows, I, wide):
        flat = wide.reshape(wide.size)
        src = w[at:at + rows * I]
        for q in range(rows * I):     # one flat loop: it vectorises (2-D indexing did not)
            flat[q] = widen(src[q])
        return flat[:rows * I].reshape((rows, I))
    return widened


@njit(inline="always", **JIT)
def _input_rows(w, o, H, I, j0, hk, x2, gin, wide, part):
    """gin[g, t B + b, r] = x[t, b] . W_ih[g H + j0 + r] for every step at once: one
    product per gate, or per block of `wide`'s rows for bfloat16 weights (widened there,
    the product written to `part` and copied into its columns of gin). Up to four rows
    (a stream's step) as the recurrent product: with BLAS one bfloat16 step at H = 1024
    took 1.9 ms, widening the weights into `wide` every step. bfloat16 weights take the
    row dot products up to 2 H rows (steps times sequences): widening a thread's share
    of W_ih costs the same for any number of rows, the dot products read the weights
    once per four rows. Inference.forward, bfloat16, one process each, alternated
    (BLAS / dots): H = 1024, T = 25, B = 1 1.31-1.58x, B = 4 1.09-1.30; H = 2048, B = 1
    1.22-1.59; H = 1024, T B = 600 1.09-1.20; H = 512, T B = 4000 1.00-1.02 and H = 256,
    T B = 3200 0.91-0.93, where BLAS keeps them."""
    TB = x2.shape[0]
    if TB <= 4 or (wide.shape[0] > 0 and TB <= 2 * H):
        _recurrent_rows(w, o, H, I, j0, hk, x2, gin)
        return
    if wide.shape[0] == 0:
        for g in range(4):
            np.dot(x2, weight_rows(w, o + (g * H + j0) * I, hk, I, wide).T, out=gin[g])
        return
    R = wide.shape[0]
    for g in range(4):
        for r0 in range(0, hk, R):
            r1 = min(r0 + R, hk)
            pr = part.reshape(part.size)[:TB * (r1 - r0)].reshape((TB, r1 - r0))
            np.dot(x2, weight_rows(w, o + (g * H + j0 + r0) * I, r1 - r0, I, wide).T, out=pr)
            for col in range(TB):
                for r in range(r1 - r0):
                    gin[g, col, r0 + r] = pr[col, r]


@njit(inline="always", **JIT)
def _cells(t, B, j0, hk, gin, rec, c, out, lengths, clip, exact):
    """This thread's units of step t (gin holds the bias already): gates, cell, h_t into
    out[t]. A sequence past its length keeps its cell and outputs 0 (its state is read
    back at its own last step)."""
    for b in range(B):
        col = t * B + b
        if t < lengths[b]:
            for r in range(hk):
                i = _sigmoid(gin[0, col, r] + rec[0, b, r], exact)
                f = _sigmoid(gin[1, col, r] + rec[1, b, r], exact)
                gg = _tanh(gin[2, col, r] + rec[2, b, r], exact)
                o = _sigmoid(gin[3, col, r] + rec[3, b, r], exact)
                cj = f * c[b, r] + i * gg
                cj = clip if cj > clip else (-clip if cj < -clip else cj)   # NaN passes
                c[b, r] = cj
                out[t, b, j0 + r] = o * _tanh(cj, exact)
        else:
            for r in range(hk):
                out[t, b, j0 + r] = 0


@njit(inline="always", **JIT)
def _pack_rows(w, o, H, K, j0, hk, pk):
    """pk (4 hk / NR, K, NR) <- this thread's rows of a weight matrix at w[o] (4H, K),
    transposed into panels (bfloat16 weights widened): column g hk + r of the panels is
    row g H + j0 + r."""
    NR = pk.shape[2]
    for col in range(pk.shape[0] * NR):
        gate = col // hk
        at = o + (gate * H + j0 + col - gate * hk) * K
        pnl, cc = col // NR, col % NR
        for kk in range(K):
            pk[pnl, kk, cc] = widen(w[at + kk])


@njit(inline="always", **JIT)
def _columns_forward(w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide, panels,
                     sync, meta, lengths, clip):
    """Thread k's share of an evaluation forward over L layers (see the module): meta
    (META) holds the sizes, k, n, its units [j0, j1) and the layers' offsets into p (and
    w, laid out alike). y (T, B, H) receives the last layer's h_t, inter (2, T, B, H) the
    layers' below it; h_n, c_n (L, B, H) the state at each sequence's last step.

    With the PANELS bit each layer's recurrent products run packed
    (``_gemm.packed_product``) from this thread's rows of W_hh, packed into the layer's
    place in `panels` at its start, unless the PACKED bit says they are there already:
    the row dot products end each row in a sum across the SIMD lanes and read h once per
    row; the packed product keeps its sums in registers over K. Where W_hh's share stays
    in L2 (H = 256) a step at B = 2 took 6.0 against 12.9 us, at B = 4 8.2 against 14.8
    (packing it: 220 us a layer)."""
    fp = flush_denormals()
    T, B, I, H, L = meta[0], meta[1], meta[2], meta[3], meta[4]
    k, n, j0, j1, opts = meta[5], meta[6], meta[7], meta[8], meta[9]
    po = meta[len(META):len(META) + L + 1]
    exact, has_bias = opts & 1 != 0, opts & 2 != 0
    use_pk, packed = opts & PANELS != 0, opts & PACKED != 0
    hk = j1 - j0
    step = sync[n * SYNC_STRIDE]        # the barrier count before this call
    TB = T * B
    NR = panel_width(p.itemsize)
    npk = 4 * hk // NR if use_pk else 0
    sc = _uview(part, 0, (B if use_pk else 0, 4 * hk))
    for layer in range(L):
        I_l = I if layer == 0 else H
        o_ih = po[layer]
        o_hh = o_ih + 4 * H * I_l
        o_b = o_hh + 4 * H * H          # bias_ih, then bias_hh (PARAMS' order)
        src = x if layer == 0 else inter[(layer - 1) % 2]
        out = y if layer == L - 1 else inter[layer % 2]
        g = gin
        _input_rows(w, o_ih, H, I_l, j0, hk, src.reshape((TB, I_l)), g, wide, part)
        # the gate's biases summed into rec (free until the steps), then added a row of
        # gin at a time: down gin's columns (stride hk) it took 630 against 19 us at H =
        # 256, T B = 600, a quarter of a thread's forward
        bsum = rec[0, 0]
        for gate in range(4 if has_bias else 0):
            for r in range(hk):
                j = gate * H + j0 + r
                bsum[r] = p[o_b + j] + p[o_b + 4 * H + j]
            for col in range(TB):
                grow = g[gate, col]
                for r in range(hk):
                    grow[r] += bsum[r]
        for b in range(B):
            for r in range(hk):
                c[b, r] = c0[layer, b, j0 + r]
        phh = _uview(panels, layer * npk * H * NR, (npk, H, NR))
        if use_pk and not packed:
            _pack_rows(w, o_hh, H, H, j0, hk, phh)
        for t in range(T):
            # a finished sequence's row of out[t - 1] is 0: its product is not used
            hp = h0[layer] if t == 0 else out[t - 1]
            if use_pk:
                packed_product(hp, phh, sc)
                for b in range(B):
                    for gate in range(4):
                        for r in range(hk):
                            rec[gate, b, r] = sc[b, gate * hk + r]
            else:
                _recurrent_rows(w, o_hh, H, H, j0, hk, hp, rec)
            if exact:       # a literal in each inlined copy (see _activations)
                _cells(t, B, j0, hk, g, rec, c, out, lengths, clip, True)
            else:
                _cells(t, B, j0, hk, g, rec, c, out, lengths, clip, False)
            step += 1
            _barrier(sync, k, n, step)
        for b in range(B):
            last = lengths[b] - 1
            for r in range(hk):
                h_n[layer, b, j0 + r] = out[last, b, j0 + r]
                c_n[layer, b, j0 + r] = c[b, r]
    restore_fp(fp)


def _sigs(bf16, serve):
    out = []
    for ft in ((types.float32,) if bf16 else (types.float32, types.float64)):
        a1, a2, a3 = (types.Array(ft, d, "C") for d in (1, 2, 3))
        i64 = types.Array(types.int64, 1, "C")
        w = types.Array(types.uint16, 1, "C") if bf16 else a1
        head = (i64, types.int64, types.int64) if serve else ()
        out.append(types.void(*head, w, a1, a3, a3, types.Array(ft, 4, "C"), a3, a3, a3, a3,
                              a3, a1, a3, a2, a2, a1, i64, i64, i64, ft))
    return out


@njit(inline="always", **JIT)
def _serve(cell, spins, me, w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide,
           panels, sync, meta, lengths, clip):
    entered(cell)
    done = load_acquire(cell, DONE)
    while True:
        seq = spin_while_equal(cell, SEQ, done, spins)
        if seq == done or load_acquire(cell, JOB) != me:
            return
        if load_acquire(cell, CMD) == FORWARD:
            _columns_forward(w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide,
                             panels, sync, meta, lengths, clip)
        done = seq
        store_release(cell, DONE, seq)


# One entry per weight type (Numba's cache keeps one index per function), each a line.
@entry(_sigs(False, False))
def columns_forward(w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide, panels,
                    sync, meta, lengths, clip):
    """Thread k's share of a column-split evaluation forward (``_columns_forward``)."""
    _columns_forward(w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide, panels,
                     sync, meta, lengths, clip)


@entry(_sigs(True, False))
def columns_forward_bf16(w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide,
                         panels, sync, meta, lengths, clip):
    """columns_forward with bfloat16 weights (w: uint16 bit patterns in p's places)."""
    _columns_forward(w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide, panels,
                     sync, meta, lengths, clip)


@entry(_sigs(False, True))
def serve_columns(cell, spins, me, w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c,
                  wide, panels, sync, meta, lengths, clip):
    """A server thread's side (see _servers.Server, _spin.serve_rows): FORWARD runs its
    share of the forward; returns at a command for another job or after `spins` idle
    reads."""
    _serve(cell, spins, me, w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide,
           panels, sync, meta, lengths, clip)


@entry(_sigs(True, True))
def serve_columns_bf16(cell, spins, me, w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec,
                       c, wide, panels, sync, meta, lengths, clip):
    """serve_columns with bfloat16 weights."""
    _serve(cell, spins, me, w, p, x, y, inter, h0, c0, h_n, c_n, gin, part, rec, c, wide,
           panels, sync, meta, lengths, clip)
