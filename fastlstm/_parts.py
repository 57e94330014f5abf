"""A layer's parts and workspaces: the buffers one kernel call reads and writes.

``Spec`` is the small frozen record of what the kernel calls need from a model (its
parameter and gradient blocks, sizes, clip, option bits); a ``_Part`` holds the
workspaces and scratch of one part of the batch and runs the layers over its rows.
The model (``lstm.LSTM``) validates, splits the batch and builds a ``Spec`` whenever
its buffers move; nothing here reads the model.
"""
from functools import partial
from typing import NamedTuple

import numpy as np

from . import _layout
from . import _validate as check
from ._compile import ensure
from ._kernels import (
    NO_DX,
    ONE_THREAD,
    PADDED,
    ZERO_STATE,
    layer_backward,
    layer_forward,
    reverse_in_time,
    segments_backward,
    segments_forward,
    zero_padding,
)
from ._recurrence import backward_chunk
from ._shared import Buffers, readonly
from ._threads import parallel_worthwhile, run_pair, run_parts

__all__ = ["Spec", "Part", "Workspace", "Segments", "rows", "split_forward", "split_backward"]


class Spec(NamedTuple):
    """What a model's kernel calls need, fixed until its buffers move (``LSTM.bind``)."""
    pblocks: tuple      # per (layer, direction) j = layer * D + direction: its flat parameters
    gblocks: tuple      # ... and its flat gradients (views into flat_grads)
    flat_grads: np.ndarray
    offsets: tuple      # per j: where its block starts in the flat buffers
    in_sizes: tuple     # per j: the layer's input features
    H: int
    P: int              # proj_size, or H
    L: int
    D: int
    clip: np.floating   # the cell clip in the model's dtype (inf: none)
    opts: int           # the kernels' option bits of the model (_kernels.opts_bits)
    wflags: tuple       # the workspace table's flags (_options.workspace_flags)
    dtype: np.dtype
    batch_first: bool
    threads: object     # int or None

    def time_major(self, a):
        return a.transpose(1, 0, 2) if self.batch_first else a


class Workspace:
    """One direction of one layer: a flat buffer for every activation and
    gradient of a (T, B) call, up to a capacity, carved by the layout table the
    kernels are compiled from. ``views(T, B)`` caches its views, so a repeated
    shape costs nothing."""

    def __init__(self, T, B, I, H, P, flags, dtype):
        self.T, self.B, self.I, self.H, self.P, self.flags = T, B, I, H, P, flags
        n = _layout.workspace_size(T, B, I, H, P, *flags)
        self.flat = check.allocate(n, dtype, f"the workspace for T={T}, B={B} (x's shape)")
        self._cache = {}

    def fits(self, T, B):
        return T <= self.T and B <= self.B

    def views(self, T, B):
        v = self._cache.get((T, B))
        if v is None:
            table = _layout.workspace_table(T, B, self.I, self.H, self.P, *self.flags)
            n = _layout.workspace_size(T, B, self.I, self.H, self.P, *self.flags)
            v = _layout.carve(self.flat[:n], table)
            v["h_out"] = v["h"][1:]
            v["h_n"], v["c_n"] = v["h"][T:], v["c"][T:]
            v["dh0"], v["dc0"] = v["dh"][None], v["dc"][None]
            v["readonly"] = {}
            self._cache[(T, B)] = v
        return v

    def readonly(self, T, B, name, transpose=False):
        """A read-only view of buffer `name` at (T, B), (B, T, ...) with `transpose`:
        the same object every call, as making one costs about half a microsecond and a
        one-layer call returns six."""
        ro = self.views(T, B)["readonly"]
        a = ro.get((name, transpose))
        if a is None:
            a = self.views(T, B)[name]
            a = ro[(name, transpose)] = readonly(a.transpose(1, 0, 2) if transpose else a)
        return a


class Segments(NamedTuple):
    """One direction's forward in segments: what its backward recomputes them from."""
    K: int                  # steps per segment (the last may have fewer)
    src: np.ndarray         # the direction's input (T, B, I), kept until the next forward
    h_start: np.ndarray     # (n_seg, B, P): each segment's starting h (keep), else (1, B, P)
    c_start: np.ndarray     # ... and c
    vmasks: dict            # the variants' masks of this direction
    lens: np.ndarray
    bits: int               # the forward's option bits (PADDED with lengths)
    out: np.ndarray         # (T, B, P): the direction's output
    seg_lens: np.ndarray    # (B,): the lengths within one segment
    first: np.ndarray       # (B, P): the output of the first step (when out is False)


def rows(state, cut):
    """A state's batch slice, or None."""
    return None if state is None else state[:, cut]


class Part:
    """The buffers of one part of the batch: a workspace per (layer, direction),
    scratch arrays, and where its weight gradients go. It runs the layers over its
    sequences; the model splits the batch and joins the parts' results."""

    def __init__(self, spec, own_grads, plans):
        """own_grads: this part adds its weight gradients into buffers of its own (summed
        by the model after the backward) rather than into the model's. plans: the model's
        plans, dropped when a workspace moves (they hold the old one)."""
        self.spec = spec
        self.flat_grads = np.zeros_like(spec.flat_grads) if own_grads else None
        self.ws = [None] * len(spec.pblocks)
        self.buf = Buffers(spec.dtype)
        self.plans = plans
        # an absent array for the segments' entries (the variants' masks, their options)
        self._none3 = np.empty((0, 1, 1), spec.dtype)
        self._none2 = np.empty((0, 1), spec.dtype)

    def gblock(self, j):
        if self.flat_grads is None:
            return self.spec.gblocks[j]
        o = self.spec.offsets[j]          # the same block in this part's own gradients
        return self.flat_grads[o:o + self.spec.pblocks[j].size]

    def views(self, j, T, B):
        ws = self.ws[j]
        if ws is None or not ws.fits(T, B):
            s = self.spec
            T_cap = T if ws is None else max(T, ws.T)
            B_cap = B if ws is None else max(B, ws.B)
            ws = self.ws[j] = Workspace(T_cap, B_cap, s.in_sizes[j], s.H, s.P, s.wflags, s.dtype)
            self.plans.clear()          # they hold the old workspace
        return ws.views(T, B)

    def _paired(self, D, work, pairs):
        """Whether a layer's two directions run at once, one thread each: when that pays
        and this part has the machine to itself (see _threads)."""
        return D == 2 and pairs and parallel_worthwhile(work, self.spec.threads)

    @staticmethod
    def _run(calls, paired):
        if paired:
            run_pair(*calls)
        else:
            for call in calls:
                call()

    def forward(self, xt, h0, c0, lens, padded, masks, vmasks, pairs=False, one_thread=True,
                seg=None, y_out=None, last_only=False):
        """one_thread: each kernel call has one thread (BLAS too), so its products may
        run packed (see _gemm); a pair of directions run at once always has. seg: None,
        or (K, keep): run each direction in segments of about K steps, keeping (keep)
        the state at each segment's start for a backward that recomputes the rest; the
        last layer's output then goes into y_out (T, B, D*P), when given. last_only (in
        segments): the last layer keeps no output but each sequence's at its own last
        step, returned (B, D*P) in y's place."""
        m = self.spec
        # each entry only where it is called: loading one from the cache takes 20-40 ms
        ensure(m.dtype, layer_forward)
        if seg is not None:
            ensure(m.dtype, segments_forward)
        if m.D == 2:
            ensure(m.dtype, reverse_in_time)
        if padded:
            ensure(m.dtype, zero_padding)
        T, B = xt.shape[:2]
        L, D, H, P = m.L, m.D, m.H, m.P
        src = xt
        if seg is not None and (seg[1] or D == 2 or xt.dtype != m.dtype
                                or not xt.flags.writeable):
            # the recomputing backward reads the input again, the reverse direction reads
            # it reversed, the kernels take the model's dtype and no read-only array: a
            # copy, which the caller cannot change
            src = self.buf.get("x_in", xt.shape)
            np.copyto(src, xt, casting="same_kind")
        self.segs = [None] * (L * D)
        for k in range(L):
            outs, calls = [], []
            paired = self._paired(D, T * B * 4 * H * (m.in_sizes[k * D] + P), pairs)
            one = ONE_THREAD if one_thread or paired else 0
            for d in range(D):
                j = k * D + d
                if seg is not None:
                    src_d = src
                    if d == 1:
                        src_d = self.buf.get(f"x_rev{k}", src.shape)
                        reverse_in_time(src, src_d, lens)
                    top = k == L - 1
                    into = False if top and last_only else y_out if top and D == 1 else None
                    calls.append(self._segments(j, src_d, h0, c0, lens, padded, vmasks, seg,
                                                m.opts | one, into))
                    outs.append(self.segs[j].out)
                    continue
                v = self.views(j, T, B)
                if d == 0:
                    np.copyto(v["x"], src, casting="same_kind")
                    if padded:
                        zero_padding(v["x"], lens)
                else:    # the reverse direction reads each sequence last step first
                    reverse_in_time(self.views(k * D, T, B)["x"], v["x"], lens)
                if h0 is not None:
                    np.copyto(v["h"][0], h0[j], casting="same_kind")
                    np.copyto(v["c"][0], c0[j], casting="same_kind")
                for name, a in vmasks.items():
                    np.copyto(v[name], a[j])
                calls.append(partial(layer_forward, m.pblocks[j], self.ws[j].flat, lens,
                                     m.clip, T, B, m.in_sizes[j], H, P,
                                     m.opts | (PADDED if padded else 0)
                                     | (ZERO_STATE if h0 is None else 0) | one))
                outs.append(v["y"] if padded else v["h_out"])
            self._run(calls, paired)
            if k == L - 1 and last_only:      # the forward direction's is its final state
                out = self.buf.get("y_last", (B, D * P))
                out[:, :P] = self.buf.get("h_n", (L * D, B, P))[k * D]
                if D == 2:        # the reverse direction's output at its first step
                    out[:, P:] = self.segs[k * D + 1].first
            elif D == 1:
                out = outs[0]
            elif k == L - 1 and y_out is not None:
                out = y_out
                out[:, :, :P] = outs[0]
                reverse_in_time(outs[1], out[:, :, P:], lens)
            else:
                out = self.buf.get(f"out{k}", (T, B, 2 * P))
                out[:, :, :P] = outs[0]
                reverse_in_time(outs[1], out[:, :, P:], lens)
            if masks[k] is not None:
                src = self.buf.get(f"dropped{k}", out.shape)
                np.multiply(out, masks[k], out=src)
            else:
                src = out
        if seg is not None:
            return out, self.buf.get("h_n", (L * D, B, P)), self.buf.get("c_n", (L * D, B, H))
        if L * D == 1:
            v = self.views(0, T, B)
            return out, v["h_n"], v["c_n"]
        h_n = self.buf.get("h_n", (L * D, B, P))
        c_n = self.buf.get("c_n", (L * D, B, H))
        for j in range(L * D):
            v = self.views(j, T, B)
            h_n[j], c_n[j] = v["h"][T], v["c"][T]
        return out, h_n, c_n

    # -- in segments (recompute, and forwards that keep nothing) -------------------

    def _segments(self, j, src, h0, c0, lens, padded, vmasks, seg, bits, out=None):
        """The call that runs direction j's forward over src (T, B, I) in segments, its
        output into `out` (a buffer of its own when None; False: its first step's only,
        into the record's ``first``); makes its record (``Segments``) and buffers here,
        on the calling thread."""
        m = self.spec
        T, B = src.shape[:2]
        K, keep = seg
        if keep:      # a whole number of the backward's chunks: its sums then run as in one call
            chunk = backward_chunk(B, m.in_sizes[j], m.H, m.P, m.dtype.itemsize,
                                   bits & ONE_THREAD != 0)
            K = -(-K // chunk) * chunk
        n_seg = -(-T // K)
        starts = self.buf.get(f"ck_h{j}", (n_seg if keep else 1, B, m.P))
        r = self.segs[j] = Segments(
            K, src, starts, self.buf.get(f"ck_c{j}", (n_seg if keep else 1, B, m.H)),
            {k: a[j] for k, a in vmasks.items()}, lens, bits | (PADDED if padded else 0),
            self.buf.get(f"y_seg{j}", (T, B, m.P)) if out is None else out,
            self.buf.get(f"lens_seg{j}", (B,), np.int64), self.buf.get(f"first{j}", (B, m.P)))
        if h0 is None:
            r.h_start[0], r.c_start[0] = 0, 0
        else:
            np.copyto(r.h_start[0], h0[j], casting="same_kind")
            np.copyto(r.c_start[0], c0[j], casting="same_kind")
        self.views(j, K if n_seg > 1 else T, B)      # the capacity, grown here, not in a thread
        h_n = self.buf.get("h_n", (m.L * m.D, B, m.P))[j]
        c_n = self.buf.get("c_n", (m.L * m.D, B, m.H))[j]
        out = r.out if r.out is not False else self._none3
        first = r.first if r.out is False else self._none2
        return partial(segments_forward, m.pblocks[j], self.ws[j].flat, src, out, first,
                       r.h_start, r.c_start, h_n, c_n, *self._masks(r), lens, r.seg_lens,
                       m.clip, T, K, B, m.in_sizes[j], m.H, m.P, r.bits)

    def _masks(self, r):
        """zh, zc, rmask of a direction's record, empty where its variants are off."""
        v = r.vmasks
        return (v.get("zh", self._none3), v.get("zc", self._none3),
                v.get("rmask", self._none2))

    def _segments_backward(self, j, grad, dh_n, dc_n, bits, dy0=None):
        """The call of direction j's backward after its forward in segments (see
        ``_kernels.segments_backward``). grad (T, B, P), or None: zeros but dy0 (B, P) at
        the first step; dh_n, dc_n: this direction's final state's gradient, or None."""
        r, m = self.segs[j], self.spec
        T, B = r.src.shape[:2]
        if grad is None:
            grad = self._none3
        elif grad.dtype != m.dtype or not grad.flags.writeable:
            mine = self.buf.get(f"dy_in{j}", grad.shape)     # the kernels take neither
            np.copyto(mine, grad, casting="same_kind")
            grad = mine
        small = []
        for name, a, size in (("dh", dh_n, m.P), ("dc", dc_n, m.H), ("dy0", dy0, m.P)):
            if a is None:
                small.append(self._none2)
            else:
                small.append(self.buf.get(f"{name}_given{j}", (B, size)))
                np.copyto(small[-1], a, casting="same_kind")
        dh, dc, d0 = small
        return partial(segments_backward, m.pblocks[j], self.gblock(j), self.ws[j].flat,
                       r.src, grad, d0, self._dx_seg(j, T, B), r.h_start, r.c_start,
                       *self._masks(r), dh, dc, r.lens, r.seg_lens, m.clip, T, r.K, B,
                       m.in_sizes[j], m.H, m.P, bits | (r.bits & PADDED))

    def _last_only_backward(self, j, d, grad, dh_n, dc_n, bits):
        """The call of direction j's backward (d its direction) of a last layer that kept
        only each sequence's last output: grad (B, D*P) joins the forward direction's
        final state's gradient (dh_n + dy: the sum the kernel makes at that step) and the
        reverse direction's first step; every other step's dy is zero."""
        m, P = self.spec, self.spec.P
        B = grad.shape[0]
        dh = self.buf.get(f"dh_last{j}", (B, P))
        dc = self.buf.get(f"dc_last{j}", (B, m.H))
        g = grad[:, d * P:(d + 1) * P]
        if dh_n is None:
            dh[:], dc[:] = 0, 0
        else:
            dh[:], dc[:] = dh_n[j], dc_n[j]
        if d == 0:
            dh += g
        return self._segments_backward(j, None, dh, dc, bits, g if d == 1 else None)

    def backward(self, grad, dh_n, dc_n, lens, masks, pairs=False, one_thread=True, seg=False,
                 last_only=False, dx_out=None, want_dx=True):
        """seg: the forward ran in segments (``forward``'s seg, keeping their states); dx
        then goes into dx_out (T, B, I), when given. last_only (with seg): grad is
        (B, D*P), the gradient on each sequence's output at its own last step
        (``forward``'s last_only). not want_dx: the first layer's calls skip dx's product
        (not in segments), and the dx returned is not to be read."""
        m = self.spec
        self.dx_out = dx_out
        ensure(m.dtype, layer_backward)
        if seg:
            ensure(m.dtype, segments_backward)
        if m.D == 2:
            ensure(m.dtype, reverse_in_time)
        T, B = (self.segs[0].src.shape[0], grad.shape[0]) if last_only else grad.shape[:2]
        L, D, H, P = m.L, m.D, m.H, m.P
        single = L * D == 1
        if not single:
            dh0 = self.buf.get("dh0", (L * D, B, P))
            dc0 = self.buf.get("dc0", (L * D, B, H))
        for k in range(L - 1, -1, -1):
            calls = []
            paired = self._paired(D, T * B * 4 * H * (m.in_sizes[k * D] + P), pairs)
            one = ONE_THREAD if one_thread or paired else 0
            for d in range(D):
                j = k * D + d
                if seg and last_only and k == L - 1:
                    calls.append(self._last_only_backward(j, d, grad, dh_n, dc_n, m.opts | one))
                    continue
                if seg:
                    g = grad if D == 1 else grad[:, :, d * P:(d + 1) * P]
                    if d == 1:         # reversed in time, whole (a segment reads its steps)
                        mine = self.buf.get(f"dy_in{k}", g.shape)
                        np.copyto(mine, g, casting="same_kind")
                        g = self.buf.get(f"dy_rev{k}", g.shape)
                        reverse_in_time(mine, g, lens)
                    calls.append(self._segments_backward(
                        j, g, None if dh_n is None else dh_n[j],
                        None if dh_n is None else dc_n[j], m.opts | one))
                    continue
                v = self.views(j, T, B)
                if D == 1:
                    np.copyto(v["dy"], grad, casting="same_kind")
                elif d == 0:
                    np.copyto(v["dy"], grad[:, :, :P], casting="same_kind")
                else:
                    g_rev = grad[:, :, P:]
                    if g_rev.dtype != m.dtype or not g_rev.flags.writeable:
                        # the kernels take the model's dtype and no read-only array
                        g_rev = self.buf.get(f"dy_rev{k}", g_rev.shape)
                        np.copyto(g_rev, grad[:, :, P:], casting="same_kind")
                    reverse_in_time(g_rev, v["dy"], lens)
                if dh_n is not None:
                    np.copyto(v["dh"], dh_n[j], casting="same_kind")
                    np.copyto(v["dc"], dc_n[j], casting="same_kind")
                skip = NO_DX if k == 0 and not want_dx else 0
                calls.append(partial(layer_backward, m.pblocks[j], self.gblock(j),
                                     self.ws[j].flat, lens, m.clip, T, B, m.in_sizes[j], H,
                                     P, m.opts | (ZERO_STATE if dh_n is None else 0) | one
                                     | skip))
            self._run(calls, paired)
            if not single:
                for j in range(k * D, k * D + D):
                    dh0[j], dc0[j] = self._dstate(j, T, B, seg)
            dxs = [self._dx_seg(j, T, B) if seg
                   else self.views(j, T, B)["dx"] for j in range(k * D, k * D + D)]
            if k == 0 and not want_dx:
                dx = dxs[0]                           # not read
            elif D == 1:
                dx = dxs[0]
            else:
                dx = (self.dx_out if k == 0 and seg and self.dx_out is not None
                      else self.buf.get(f"dx{k}", dxs[0].shape))
                reverse_in_time(dxs[1], dx, lens)
                dx += dxs[0]
            if k > 0 and masks[k - 1] is not None:
                grad = self.buf.get(f"dmasked{k}", dx.shape)
                np.multiply(dx, masks[k - 1], out=grad)
            else:
                grad = dx
        if single:
            dh0, dc0 = (a[None] for a in self._dstate(0, T, B, seg))
        return grad, dh0, dc0

    def _dx_seg(self, j, T, B):
        """Where direction j's dx goes in segments: the caller's dx_out for the first
        layer of one direction (no copy of x's size), else a buffer of its own."""
        if j == 0 and self.spec.D == 1 and self.dx_out is not None:
            return self.dx_out
        return self.buf.get(f"dx_seg{j}", (T, B, self.spec.in_sizes[j]))

    def _dstate(self, j, T, B, seg):
        """Direction j's (dh0, dc0) after its backward: in the workspace's rows that do
        not hold T, the same for every segment's view."""
        v = self.views(j, min(T, self.segs[j].K) if seg else T, B)
        return v["dh"], v["dc"]


def split_forward(split, xt, h0, c0, lens, padded, masks, vmasks, seg, in_parts, y, h_n, c_n):
    """The forward of every part of a split batch at once (``split``: [(part, first,
    end)], see _threads), each over its rows, gathered into y ((T, B, D*P), or (B, D*P)
    with in_parts: each sequence's last output), h_n and c_n. In segments each part
    writes its rows of y itself (no second copy of x's size)."""
    def run(part, cut):
        return part.forward(xt[:, cut], rows(h0, cut), rows(c0, cut), lens[cut], padded,
                            [None if m is None else m[:, cut] for m in masks],
                            {k: a[:, cut] if k == "rmask" else a[:, :, cut]
                             for k, a in vmasks.items()}, seg=seg,
                            y_out=None if seg is None or in_parts else y[:, cut],
                            last_only=in_parts)
    results = run_parts([partial(run, part, slice(b0, b1)) for part, b0, b1 in split])
    for (_, b0, b1), (o, h, c) in zip(split, results):
        if in_parts:
            y[b0:b1] = o
        elif seg is None:
            y[:, b0:b1] = o
        h_n[:, b0:b1], c_n[:, b0:b1] = h, c


def split_backward(split, flat_grads, grad, dh_n, dc_n, lens, masks, seg, last_only,
                   dx, dh0, dc0, want_dx=True):
    """The backward of every part of the last forward's split batch (grad time-major,
    or (B, D*P) with last_only); parts past the first add into gradients of their own,
    summed into flat_grads after, in order (the same sum every time). dx (time-major;
    not when not want_dx), dh0 and dc0 are filled by rows."""
    def run(r, part, cut):
        if r:
            part.flat_grads.fill(0)
        return part.backward(grad[cut] if last_only else grad[:, cut], rows(dh_n, cut),
                             rows(dc_n, cut), lens[cut],
                             [None if m is None else m[:, cut] for m in masks], seg=seg,
                             last_only=last_only, dx_out=dx[:, cut] if seg else None,
                             want_dx=want_dx)
    results = run_parts([partial(run, r, part, slice(b0, b1))
                         for r, (part, b0, b1) in enumerate(split)])
    for part, _, _ in split[1:]:
        flat_grads += part.flat_grads
    for (_, b0, b1), (d, h, c) in zip(split, results):
        if not seg and want_dx:
            dx[:, b0:b1] = d
        dh0[:, b0:b1], dc0[:, b0:b1] = h, c
