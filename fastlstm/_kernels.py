"""Numba kernels' entry points: one LSTM layer's forward and backward, in place.

Numba unboxes every array argument on each call (about half a microsecond
apiece); at small sizes that dominated a forward+backward. So the public layer
passes flat arrays (one direction of one layer's parameters, gradients and
workspace), the sizes and the options as the bits of one integer; the views are
carved here (``params_of``, ``workspace_of``: the one decode-and-carve every
entry uses) into named tuples by functions compiled from the tables in
``_layout``, the same tables Python carves its views and names from.

The rooms behind the entries: ``_activations`` (tanh, sigmoid), ``_cell`` (one
step's elementwise maths, plain and variant), ``_recurrence`` (forward and
backward through time), ``_gemm`` (the packed products); the servers' loop that
calls these entries is ``_spin.serve_rows``.
"""
from numba import njit, types

from . import _activations, _cell, _gemm, _layout, _numba_ext, _recurrence
from ._cell import _gates_forward, _state_forward
from ._compile import entry
from ._config import JIT, follow
from ._gemm import packed_product, panel_width
from ._numba_ext import flush_denormals, make_view, restore_fp
from ._recurrence import _accumulate, _uview, lstm_backward, lstm_forward

#: the files whose code the entries' cache entries carry (they inline or link all of it);
#: a cached function that calls an entry follows these and this file
SOURCES = tuple(m.__file__ for m in (_activations, _cell, _recurrence, _layout, _gemm,
                                     _numba_ext))
follow(__file__, *SOURCES)
SOURCES += (__file__,)

__all__ = ["layer_forward", "layer_backward", "rows_forward", "rows_backward", "opts_bits",
           "OPTS", "LATER", "EARLIER", "PACKED", "segments_forward", "segments_backward",
           "stream_step", "STREAM_META", "reverse_in_time", "zero_padding", "param_views",
           "workspace_views", "params_of", "workspace_of", "LAYER"]

def _compile_carving(fname, table, tuple_cls, dims, counted=False, bits=False):
    ns = {tuple_cls.__name__: tuple_cls, "_view": make_view(counted)}
    exec(_layout.carving_source(fname, table, tuple_cls.__name__, dims, bits), ns)
    # Not cached on its own (it has no source file); the cached kernels that
    # inline it carry it in their own cache entries.
    return njit(inline="always", **dict(JIT, cache=False))(ns[fname])


#: the one decode-and-carve of every entry: flat buffer, sizes and option bits in, views out
params_of = _compile_carving("params_of", _layout.PARAMS, _layout.Params, ("I", "H", "P"),
                             bits=True)
workspace_of = _compile_carving("workspace_of", _layout.WORKSPACE, _layout.Workspace,
                                _layout.DIMS, bits=True)
# for the views param_views / workspace_views return to Python
_params_counted = _compile_carving("params_of", _layout.PARAMS, _layout.Params,
                                   ("I", "H", "P"), counted=True, bits=True)
_workspace_counted = _compile_carving("workspace_of", _layout.WORKSPACE, _layout.Workspace,
                                      _layout.DIMS, counted=True, bits=True)


@njit(**JIT)
def param_views(p, I, H, P, opts):
    """The kernels' carving of one direction's parameters (a ``_layout.Params``) by the
    option bits; an absent parameter is empty. For tests: Python carves with
    ``_layout.carve``."""
    return _params_counted(p, I, H, P, opts)


@njit(**JIT)
def workspace_views(ws, T, B, I, H, P, opts):
    """The kernels' carving of one direction's workspace (a ``_layout.Workspace``)."""
    return _workspace_counted(ws, T, B, I, H, P, opts)


#: bit k of a kernel call's `opts` is option k: the layout's flags, then four of the call's
#: (zero_state: the initial state, or in backward the final state's gradient, is zero;
#: setting it here saves two NumPy calls per call, a tenth of a seed-size forward;
#: one_thread: the call has one thread, so its products may run packed, see _gemm;
#: later, earlier: a backward call is one segment of a longer sequence, see lstm_backward;
#: packed: an earlier segment of the same pass left this call's weights packed in the
#: workspace, see lstm_forward; no_dx: a backward that leaves dx unwritten, no one wants it)
OPTS = _layout.FLAGS + ("padded", "exact", "zero_state", "one_thread", "later", "earlier",
                        "packed", "no_dx")
(BIAS, PROJ, PEEPHOLE, LAYER_NORM, ZONEOUT, RDROP, RECOMPUTE, PADDED, EXACT, ZERO_STATE,
 ONE_THREAD, LATER, EARLIER, PACKED, NO_DX) = (1 << k for k in range(len(OPTS)))


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


@entry(_entry_sigs(2))
def layer_forward(p, ws, lengths, clip, T, B, I, H, P, opts):
    """``lstm_forward`` on one direction's flat parameters and workspace.

    x, h0, c0 are read from the workspace's x, h[0], c[0] (and the variants'
    masks from zh, zc, rmask); with the ZERO_STATE bit, h[0] and c[0] are zeroed
    here. With the PADDED bit, y receives h_t with the steps past each sequence's
    length zeroed. Both entries run with subnormals flushed to zero (the thread's
    setting restored on return; see _numba_ext.flush_denormals).
    """
    fp = flush_denormals()
    has_bias, has_proj = opts & BIAS != 0, opts & PROJ != 0
    peep, ln, zone, rdrop = (opts & PEEPHOLE != 0, opts & LAYER_NORM != 0, opts & ZONEOUT != 0,
                             opts & RDROP != 0)
    w = params_of(p, I, H, P, opts)
    v = workspace_of(ws, T, B, I, H, P, opts)
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
                 opts & ONE_THREAD != 0, opts & PACKED != 0)
    if opts & PADDED:
        for t in range(T):
            for b in range(B):
                if t < lengths[b]:
                    v.y[t, b] = v.h[t + 1, b]
                else:
                    v.y[t, b] = 0
    restore_fp(fp)


@entry(_entry_sigs(3))
def layer_backward(p, g, ws, lengths, clip, T, B, I, H, P, opts):
    """``lstm_backward`` on one direction's flat buffers; dy, dh_n, dc_n are read
    from the workspace's dy, dh, dc (zeroed here with the ZERO_STATE bit), and the
    gradients are added into g."""
    has_bias, has_proj = opts & BIAS != 0, opts & PROJ != 0
    peep, ln, zone, rdrop = (opts & PEEPHOLE != 0, opts & LAYER_NORM != 0, opts & ZONEOUT != 0,
                             opts & RDROP != 0)
    fp = flush_denormals()
    w = params_of(p, I, H, P, opts)
    dw = params_of(g, I, H, P, opts)
    v = workspace_of(ws, T, B, I, H, P, opts)
    if opts & ZERO_STATE:
        v.dh[:] = 0
        v.dc[:] = 0
    m = v.m if has_proj or zone else v.h[1:]
    lstm_backward(w, dw, v, m, lengths, clip, peep, ln, zone, rdrop, opts & ONE_THREAD != 0,
                  opts & LATER != 0, opts & EARLIER != 0, opts & PACKED != 0,
                  opts & NO_DX == 0)
    last = opts & EARLIER == 0        # else the sum over db's steps goes on in the next call
    if has_bias and last:
        _accumulate(dw.bias_ih, v.db)
        _accumulate(dw.bias_hh, v.db)
    if ln and last:
        _accumulate(dw.ln_ih_bias, v.db)
        _accumulate(dw.ln_hh_bias, v.db)
    restore_fp(fp)


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
def _backward_rows_out(v, dx, dh0, dc0, b0, opts):
    """A part's input gradients into rows [b0, b0 + B) of the whole batch's dx (unless
    the call had NO_DX), dh0, dc0."""
    B = v.x.shape[1]
    if opts & NO_DX == 0:
        _copy_rows(v.dx, 0, dx, b0, B)
    for b in range(B):
        for j in range(v.dh.shape[1]):
            dh0[0, b0 + b, j] = v.dh[b, j]
        for j in range(v.dc.shape[1]):
            dc0[0, b0 + b, j] = v.dc[b, j]


@entry(_rows_sigs(2, 4), needs=(layer_forward,))
def rows_forward(p, ws, x, y, h_n, c_n, b0, lengths, clip, T, B, I, H, P, opts):
    """``layer_forward`` on rows [b0, b0 + B) of x (T, *, I), writing those rows of
    y (T, *, P), h_n (1, *, P) and c_n (1, *, H). One layer, one direction, full lengths
    (no padding), no variant masks."""
    v = workspace_of(ws, T, B, I, H, P, opts)
    _copy_rows(x, b0, v.x, 0, B)
    layer_forward(p, ws, lengths, clip, T, B, I, H, P, opts)
    _forward_rows_out(v, y, h_n, c_n, b0)


@entry(_rows_sigs(3, 4), needs=(layer_backward,))
def rows_backward(p, g, ws, dy, dx, dh0, dc0, b0, lengths, clip, T, B, I, H, P, opts):
    """``layer_backward`` after ``rows_forward``: reads rows [b0, b0 + B) of dy (T, *, P),
    writes those of dx (T, *, I), dh0 (1, *, P) and dc0 (1, *, H); the gradients are
    added into g."""
    v = workspace_of(ws, T, B, I, H, P, opts)
    _copy_rows(dy, b0, v.dy, 0, B)
    layer_backward(p, g, ws, lengths, clip, T, B, I, H, P, opts)
    _backward_rows_out(v, dx, dh0, dc0, b0, opts)


def _segments_sigs(backward):
    """segments_forward's / segments_backward's signatures (see there)."""
    out = []
    for ft in (types.float32, types.float64):
        a3, a2 = types.Array(ft, 3, "A"), types.Array(ft, 2, "A")
        flat, c3 = types.Array(ft, 1, "C"), types.Array(ft, 3, "C")
        head = [flat] * (3 if backward else 2) + [a3]           # p, (g,) ws, src
        head += [a3, a2, a3] if backward else [a3, a2]          # grad, dy0, dx / out, first
        head += [c3, c3]                                        # h_start, c_start
        head += [] if backward else [a2, a2]                    # h_n, c_n
        head += [a3, a3, a2]                                    # zh, zc, rmask
        head += [a2, a2] if backward else []                    # dh_n, dc_n
        i64 = types.Array(types.int64, 1, "C")
        out.append(types.void(*head, i64, i64, ft, *[types.int64] * 7))
    return out


# A forward or backward over all T steps in segments of K (recompute; forwards that keep
# nothing) as one call per direction: the segments' loop in Python, its copies and kernel
# calls, cost 15-35 us a segment and held the GIL against the other part's thread (at
# long, float32, with K = 32 a fwd+bwd took 1.7x the time of keeping every step).

@njit(inline="always", **JIT)
def _run_segment(p, ws, src, h_start, c_start, zh, zc, rmask, lengths, seg_lens, clip, T, K,
                 i, B, I, H, P, opts):
    """Segment i's forward (steps [i K, i K + n)) from its starting state h_start[i]
    (h_start[0] when one row carries it), its input copied in (zeroed past each length
    with PADDED), its masks sliced: (first step, steps)."""
    s0 = i * K
    n = min(T, s0 + K) - s0
    v = workspace_of(ws, n, B, I, H, P, opts)
    for b in range(B):
        seg_lens[b] = min(max(lengths[b] - s0, 0), n)
    pad = opts & PADDED != 0
    for t in range(n):
        for b in range(B):
            live = not pad or t < seg_lens[b]
            for k in range(I):
                v.x[t, b, k] = src[s0 + t, b, k] if live else 0
    row = i if h_start.shape[0] > 1 else 0
    v.h[0] = h_start[row]
    v.c[0] = c_start[row]
    if zh.shape[0] > 0:
        v.zh[:] = zh[s0:s0 + n]
        v.zc[:] = zc[s0:s0 + n]
    if rmask.shape[0] > 0:
        v.rmask[:] = rmask
    layer_forward(p, ws, seg_lens, clip, n, B, I, H, P, opts)
    return s0, n


@entry(_segments_sigs(False), needs=(layer_forward,))
def segments_forward(p, ws, src, out, first, h_start, c_start, h_n, c_n, zh, zc, rmask,
                     lengths, seg_lens, clip, T, K, B, I, H, P, opts):
    """``layer_forward`` over src (T, B, I) in segments of K steps. h_start, c_start
    (n_seg, B, .) hold each segment's starting state, row 0 given (keep), or (1, B, .)
    carrying it from one segment to the next (nothing kept); the final state goes into
    h_n, c_n. The output goes into out (T, B, P), or, when out has no steps, the first
    step's only into first (B, P) (none when first has no rows). zh, zc (T, B, .) and
    rmask (B, P): this direction's masks, empty without their variants."""
    n_seg = (T + K - 1) // K
    s0, n = 0, 0
    for i in range(n_seg):
        s0, n = _run_segment(p, ws, src, h_start, c_start, zh, zc, rmask, lengths, seg_lens,
                             clip, T, K, i, B, I, H, P, opts | (PACKED if i > 0 else 0))
        v = workspace_of(ws, n, B, I, H, P, opts)
        if out.shape[0] > 0:
            src_out = v.y if opts & PADDED else v.h[1:]
            for t in range(n):
                out[s0 + t] = src_out[t]
        elif i == 0 and first.shape[0] > 0:
            first[:] = v.h[1]
        if i + 1 < n_seg:
            row = i + 1 if h_start.shape[0] > 1 else 0
            h_start[row] = v.h[n]
            c_start[row] = v.c[n]
    v = workspace_of(ws, n, B, I, H, P, opts)
    h_n[:] = v.h[n]
    c_n[:] = v.c[n]


@entry(_segments_sigs(True), needs=(layer_forward, layer_backward))
def segments_backward(p, g, ws, src, grad, dy0, dx, h_start, c_start, zh, zc, rmask, dh_n,
                      dc_n, lengths, seg_lens, clip, T, K, B, I, H, P, opts):
    """``layer_backward`` after ``segments_forward`` (keeping), last segment first: each
    recomputed from its starting state (the last one's steps are still in the
    workspace), then differentiated, the sums carried into the next call (LATER,
    EARLIER). grad (T, B, P), or no steps: zeros but dy0 (B, P) at step 0; dh_n, dc_n
    (B, .), or no rows: zeros. dx (T, B, I) receives the input's gradient; dh0, dc0 are
    left in the workspace."""
    n_seg = (T + K - 1) // K
    for i in range(n_seg - 1, -1, -1):
        if i < n_seg - 1:      # the weights packed again once: they may have moved since
            s0, n = _run_segment(p, ws, src, h_start, c_start, zh, zc, rmask, lengths,
                                 seg_lens, clip, T, K, i, B, I, H, P,
                                 opts | (PACKED if i < n_seg - 2 else 0))
        else:
            s0 = i * K
            n = T - s0
            for b in range(B):
                seg_lens[b] = min(max(lengths[b] - s0, 0), n)
        v = workspace_of(ws, n, B, I, H, P, opts)
        for t in range(n):
            if grad.shape[0] > 0:
                v.dy[t] = grad[s0 + t]
            else:
                v.dy[t] = 0
        if i == 0 and dy0.shape[0] > 0:
            v.dy[0] = dy0
        bits = opts | (EARLIER if i > 0 else 0)
        if i < n_seg - 1:
            bits |= LATER | PACKED
        elif dh_n.shape[0] > 0:
            v.dh[:] = dh_n
            v.dc[:] = dc_n
        else:
            bits |= ZERO_STATE
        layer_backward(p, g, ws, seg_lens, clip, n, B, I, H, P, bits)
        for t in range(n):
            dx[s0 + t] = v.dx[t]


#: the option bits of a layer that is not plain (its step needs ``lstm_forward``)
VARIANTS = PROJ | PEEPHOLE | LAYER_NORM | ZONEOUT | RDROP


@njit(inline="always", **JIT)
def _plain_products(v, src, h):
    """A plain layer's step, products: gates (B, 4H) <- src W_ih^T, rec <- h W_hh^T,
    as ``lstm_forward`` runs them over T = 1 (so bitwise the same), from the weights an
    earlier step's ``lstm_forward`` packed into the workspace's panels. One loop over
    the two: each inlined product added about 2 s to the entry's compile."""
    H, I = h.shape[1], src.shape[1]
    NR = panel_width(h.itemsize)
    for q in range(2):
        pk = _uview(v.w_ih_pk if q == 0 else v.w_hhT, 0, (4 * H // NR, I if q == 0 else H, NR))
        packed_product(src if q == 0 else h, pk, v.gates[0] if q == 0 else v.rec)


@njit(inline="always", **JIT)
def _plain_cells(v, h, c, clip, exact):
    """A plain layer's step, cell maths on the state (h, c) (B, H) in place (the new c
    written to the workspace's c[1] first: the same loops as lstm_forward's)."""
    gates, rec, c_new = v.gates[0], v.rec, v.c[1]
    for b in range(h.shape[0]):
        _gates_forward(gates[b], rec[b], v.bias, exact)
        _state_forward(gates[b], c[b], c_new[b], v.tanh_c[0, b], h[b], clip, exact)
        for j in range(h.shape[1]):
            c[b, j] = c_new[b, j]


#: stream_step's meta array: these sizes, then the layers' parameter offsets (L + 1),
#: workspace offsets (L + 1) and the lengths (B ones)
STREAM_META = ("L", "B", "I", "H", "P", "opts", "y", "h", "c")


@entry(["void(float32[::1], float32[::1], float32[:, ::1], int64[::1], float32)",
        "void(float64[::1], float64[::1], float64[:, ::1], int64[::1], float64)"],
       needs=(layer_forward,))
def stream_step(p, ws, x, meta, clip):
    """One step of a stack of L one-direction layers (``Inference.stream``). Five
    arguments: the dispatcher's checks cost about 0.1 us apiece, a tenth of a step at
    H = 64. meta (STREAM_META): layer k's parameters are p[po[k]:po[k + 1]], its one-step
    workspace ws[wo[k]:wo[k + 1]]; ws also holds y (B, P) and the state h (L, B, P), c
    (L, B, H), carried in place. Each layer is ``layer_forward`` over T = 1, or once its
    weights are packed (PACKED in opts), for a plain layer, its products and cell maths
    alone (``_plain_products``, ``_plain_cells``): a stream of T steps computes what a
    forward over them does."""
    L, B, I, H, P, opts = meta[0], meta[1], meta[2], meta[3], meta[4], meta[5]
    n = len(STREAM_META)
    po, wo = meta[n:n + L + 1], meta[n + L + 1:n + 2 * L + 2]
    if opts & VARIANTS == 0 and opts & ONE_THREAD != 0 and opts & PACKED != 0 and (
            4 * H) % panel_width(ws.itemsize) == 0:
        # views without reference counts: the counted ones' increments and decrements
        # cost about 0.13 us a step (B = 1, I = 32, H = 64)
        fp = flush_denormals()
        y, h, c = _uview(ws, meta[6], (B, P)), _uview(ws, meta[7], (L, B, P)), _uview(
            ws, meta[8], (L, B, H))
        for k in range(L):
            I_k = I if k == 0 else P
            src = x if k == 0 else h[k - 1]
            v = workspace_of(_uview(ws, wo[k], (wo[k + 1] - wo[k],)), 1, B, I_k, H, P, opts)
            # what lstm_forward does over T = 1 (the first step ran it: the weights are
            # packed, the biases summed in v.bias), without its copies in and out of the
            # workspace: they cost about 0.8 of a 1.7 us step at B = 1, I = 32, H = 64
            _plain_products(v, src, h[k])
            if opts & EXACT:        # a literal in each inlined copy (see _activations)
                _plain_cells(v, h[k], c[k], clip, True)
            else:
                _plain_cells(v, h[k], c[k], clip, False)
        last = h[L - 1]
        for b in range(B):
            for j in range(P):
                y[b, j] = last[b, j]
        restore_fp(fp)
        return
    lengths = meta[n + 2 * L + 2:n + 2 * L + 2 + B]
    y = ws[meta[6]:meta[6] + B * P].reshape((B, P))
    h = ws[meta[7]:meta[7] + L * B * P].reshape((L, B, P))
    c = ws[meta[8]:meta[8] + L * B * H].reshape((L, B, H))
    for k in range(L):
        I_k = I if k == 0 else P
        wk = ws[wo[k]:wo[k + 1]]
        v = workspace_of(wk, 1, B, I_k, H, P, opts)
        if k == 0:
            v.x[0] = x
        else:
            v.x[0] = y
        v.h[0] = h[k]
        v.c[0] = c[k]
        layer_forward(p[po[k]:po[k + 1]], wk, lengths, clip, 1, B, I_k, H, P, opts)
        h[k] = v.h[1]
        c[k] = v.c[1]
        y[:] = v.h[1]


@entry(["void(float32[:, :, :], float32[:, :, :], int64[::1])",
        "void(float64[:, :, :], float64[:, :, :], int64[::1])"])
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


@entry(["void(float32[:, :, ::1], int64[::1])", "void(float64[:, :, ::1], int64[::1])"])
def zero_padding(a, lengths):
    """a[t, b] = 0 for t >= lengths[b]: padded input steps must not leak into the
    weight gradients (0 * NaN is NaN)."""
    for t in range(a.shape[0]):
        for b in range(a.shape[1]):
            if t >= lengths[b]:
                a[t, b] = 0


#: the entries a layer's general path calls (the split plans add rows_* and _spin.serve_rows)
LAYER = (layer_forward, layer_backward, reverse_in_time, zero_padding)
