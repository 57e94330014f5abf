"""Plans: a repeated call, made once.

A model called again at a shape it has run takes a plan instead of the general path
(``_parts.Part``): the kernels' arguments, the buffers and the views a call returns
are built on the first call, so that a call is a copy, the kernel and a return. A
plan is also the record of its forward (``Last``) that ``backward`` differentiates.
"""
import threading
from functools import partial

import numpy as np

from ._columns import (
    META,
    PACKED,
    PANELS,
    SYNC_STRIDE,
    columns_forward,
    columns_forward_bf16,
    serve_columns,
    serve_columns_bf16,
    unit_ranges,
)
from ._columns_train import columns_train, serve_columns_train
from ._compile import ensure, ready
from ._gemm import panel_width
from ._kernels import (
    BIAS,
    EXACT,
    NO_DX,
    ONE_THREAD,
    ZERO_STATE,
    layer_backward,
    layer_forward,
    rows_backward,
    rows_forward,
)
from ._servers import new_job, release_servers, take_servers
from ._shared import aligned_empty, aligned_zeros, readonly
from ._spin import BACKWARD, BACKWARD_NO_DX, FORWARD, serve_rows
from ._threads import _inside, enter_single_threaded_blas, leave_single_threaded_blas, run_parts

__all__ = ["Last", "Plan", "Plans", "SplitPlan", "ColumnPlan", "ColumnTrainPlan",
           "MAX_SPLIT_PLANS"]


class Last:
    """What backward differentiates: the last forward's shape, lengths, dropout
    masks, and the thread that ran it. A plan is its own record (these fields, and
    the model's ``_last`` the plan itself): a record that referred back to its plan
    made a cycle, which kept a dropped plan and its workspace alive until the cyclic
    collector came by (T changing every step piled up gigabytes)."""

    def __init__(self, T, B, lengths, masks, vmasks, split, one_thread=True, seg=None,
                 kept=True, last_only=False):
        self.T, self.B, self.lengths, self.masks, self.split = T, B, lengths, masks, split
        self.vmasks, self.one_thread = vmasks, one_thread
        self.seg = seg          # the forward's segments (see lstm._segmenting), or None
        self.kept = kept        # the forward kept what backward needs
        self.last_only = last_only      # it returned each sequence's last output only
        self.thread = threading.get_ident()


class Plan(Last):
    """A repeated call, made once: a one-layer, one-direction, one-part model called at
    one x shape without state or lengths. It holds the kernels' arguments, the
    workspace's x and dy and the views a call returns, so that a call is a copy, the
    kernel and a return; at seed size, building these each call was two thirds of a
    forward+backward. Plans are dropped when the workspace or the parameters move."""

    def __init__(self, spec, T, B, split, lens):
        ensure(spec.dtype, layer_forward)
        #: layer_backward is compiled (see _compile); else backward() compiles it first
        self.backward_ready = ready(spec.dtype, layer_backward)
        part = split[0][0]
        v = part.views(0, T, B)
        ws, bf = part.ws[0], spec.batch_first
        sizes = (lens, spec.clip, T, B, spec.in_sizes[0], spec.H, spec.P,
                 spec.opts | ZERO_STATE | ONE_THREAD)
        self.ws, self.lens, self.sizes = ws.flat, lens, sizes
        self.fargs = (spec.pblocks[0], ws.flat) + sizes
        self.bargs = (spec.pblocks[0], part.gblock(0), ws.flat) + sizes
        self.bargs_no_dx = self.bargs[:-1] + (self.bargs[-1] | NO_DX,)
        self.x, self.dy = (v["x"], v["dy"]) if not bf else (
            v["x"].transpose(1, 0, 2), v["dy"].transpose(1, 0, 2))
        self.out = (ws.readonly(T, B, "h_out", bf), (ws.readonly(T, B, "h_n"),
                                                      ws.readonly(T, B, "c_n")))
        self.grad_out = (ws.readonly(T, B, "dx", bf), (ws.readonly(T, B, "dh0"),
                                                        ws.readonly(T, B, "dc0")))
        Last.__init__(self, T, B, lens, [None], {}, split)

    def ready_backward(self):
        ensure(self.x.dtype, layer_backward)
        self.backward_ready = True


#: plans with buffers of their own (y, dx: all but Plan, whose are its part's) that a
#: model keeps, the most recent shapes'
MAX_SPLIT_PLANS = 8


class Plans(dict):
    """A model's plans by shape. ``put`` keeps those with buffers of their own to the
    last MAX_SPLIT_PLANS made, so that a run over many shapes (e.g. T varying) does not
    pile them up."""

    def put(self, key, plan):
        self.pop(key, None)
        held = [k for k, p in self.items() if type(p) is not Plan]
        for k in held[:max(len(held) - MAX_SPLIT_PLANS + 1, 0)]:
            del self[k]
        self[key] = plan
        return plan


class SplitPlan(Last):
    """A repeated call split across threads, made once: as _Plan, for a shape whose
    batch is split into parts (see _threads). Part 0 runs here as one kernel call that
    copies its rows in and out (_kernels.rows_forward); each other part runs on a server
    thread that waits for it in compiled code (_servers.Server, _spin.serve_rows),
    its rows of x or dy copied into its workspace here first. So neither thread waits on
    the other's Python or on a wake-up: at small size (float32) a forward's wall time
    beyond part 0's kernel went from about 130 us (the pool's hand-off) to 50-80 us.
    Taken while the model would split the batch the same way, and for x and dy of the
    model's dtype; when another thread holds the servers, the parts go to the thread
    pool instead."""

    def __init__(self, spec, T, B, split, lens):
        ensure(spec.dtype, rows_forward, serve_rows)
        self.spec, self.split = spec, split
        P, H, I = spec.P, spec.H, spec.in_sizes[0]
        dt = spec.dtype
        self.y = aligned_empty((T, B, P), dt)
        self.h_n, self.c_n = aligned_empty((1, B, P), dt), aligned_empty((1, B, H), dt)
        self.dx = aligned_empty((T, B, I), dt)
        self.dh0, self.dc0 = aligned_empty((1, B, P), dt), aligned_empty((1, B, H), dt)
        self.parts, self.jobs = [], []
        for part, b0, b1 in split:
            v = part.views(0, T, b1 - b0)            # its workspace, allocated now
            sizes = (lens[b0:b1], spec.clip, T, b1 - b0, I, H, P,
                     spec.opts | ZERO_STATE | ONE_THREAD)
            self.parts.append((part, b0, b1, v, sizes))
        for part, b0, _, _, sizes in self.parts[1:]:
            number = new_job()
            args = (number, spec.pblocks[0], part.gblock(0), part.ws[0].flat, self.y,
                    self.h_n, self.c_n, self.dx, self.dh0, self.dc0, b0) + sizes
            self.jobs.append((number, lambda cell, spins, args=args:
                              serve_rows(cell, spins, *args)))
        bf = spec.batch_first
        self.out = (readonly(self.y.transpose(1, 0, 2) if bf else self.y),
                    (readonly(self.h_n), readonly(self.c_n)))
        self.grad_out = (readonly(self.dx.transpose(1, 0, 2) if bf else self.dx),
                         (readonly(self.dh0), readonly(self.dc0)))
        self.dy_shape = self.out[0].shape
        self.copies = {}                  # "x", "dy": read-only inputs copied (_writable)
        Last.__init__(self, T, B, lens, [None], {}, split)

    def _run(self, src, name, cmd, call):
        """Post each other part's command, its rows of src copied into its workspace's
        `name`; run part 0 here; wait for the others."""
        # No deferred_interrupt on this path (it made a small fwd+bwd about 5 % slower):
        # every lock here is C-level, wait() renews a server's wake-up, take_servers gives
        # this thread back servers it still holds, and the BLAS token is discarded first
        # thing in the finally (see _threads._inside).
        token = object()
        try:
            servers = take_servers(len(self.parts) - 1)
            if servers is None:
                run_parts([partial(call, part, b0, sizes)
                           for part, b0, _, _, sizes in self.parts])
                return
            try:
                enter_single_threaded_blas(token)
                for server, job, (_, b0, b1, v, _) in zip(servers, self.jobs, self.parts[1:]):
                    np.copyto(v[name], src[:, b0:b1])
                    server.post(*job, cmd)
                part, b0, _, _, sizes = self.parts[0]
                call(part, b0, sizes)
            finally:
                _inside.discard(token)
                for server in servers:          # failed or not: none still in our buffers
                    server.wait(server.posted())
                leave_single_threaded_blas()
        finally:
            release_servers()

    def _writable(self, a, name):
        """a, or a copy in a buffer of this plan's when it is read-only: the kernels
        read the caller's rows in place but take no read-only array."""
        if a.flags.writeable:
            return a
        buf = self.copies.get(name)
        if buf is None:
            buf = self.copies[name] = aligned_empty(a.shape, a.dtype)
        np.copyto(buf, a)
        return buf

    def forward(self, x):
        m = self.spec
        xt = self._writable(m.time_major(x), "x")
        self._run(xt, "x", FORWARD, lambda part, b0, sizes: rows_forward(
            m.pblocks[0], part.ws[0].flat, xt, self.y, self.h_n, self.c_n, b0, *sizes))
        return self.out

    def backward(self, dy, want_dx=True):
        """The parts' backward; with not want_dx, dx is left unwritten."""
        m = self.spec
        ensure(m.dtype, rows_backward)
        dyt = self._writable(m.time_major(dy), "dy")
        skip = 0 if want_dx else NO_DX

        def call(part, b0, sizes):
            if part is not self.parts[0][0]:          # the pool's way: the others' sums
                part.flat_grads.fill(0)
            rows_backward(m.pblocks[0], part.gblock(0), part.ws[0].flat, dyt, self.dx,
                          self.dh0, self.dc0, b0, *sizes[:-1], sizes[-1] | skip)
        self._run(dyt, "dy", BACKWARD if want_dx else BACKWARD_NO_DX, call)
        for part, _, _, _, _ in self.parts[1:]:      # in order: the same sum every time
            np.add(m.flat_grads, part.flat_grads, out=m.flat_grads)
        return self.grad_out


#: where a column plan's meta array holds the kernel's option bits
_OPTS = META.index("opts")


class ColumnPlan:
    """An evaluation forward split by hidden units over n threads (see _columns), made
    once per (T, B): its buffers, each thread's share and the servers' jobs. Thread 0
    runs here, the others on the servers (_servers.Server), which meet at a barrier in
    compiled code once per step.

    weights: None to read the model's flat parameters where they lie, or their bfloat16
    copy (uint16, the same length: ``_columns.to_bfloat16``)."""

    #: rows of bfloat16 weights widened at a time for the input product (see _columns)
    WIDE_ROWS = 64
    #: the most bytes of W_hh a thread packs (it stays in L2, 2 MB a core here), and the
    #: fewest steps a call packs them for
    PANEL_BYTES, PANEL_STEPS = 1 << 20, 32

    def __init__(self, spec, flat_params, T, B, n, weights=None, carry=None, kept=False):
        """carry: None, or (h, c) (L, B, H) arrays that are both h0, c0 and h_n, c_n (a
        stream's state, carried in place: each thread writes its units of the new state
        after the last step's barrier, when no thread reads the old one any more).
        kept: the caller gives ``forward`` the weights' version (see there), so that
        panels packed once serve many calls."""
        bf16 = weights is not None
        fwd, serve = ((columns_forward_bf16, serve_columns_bf16) if bf16
                      else (columns_forward, serve_columns))
        ensure(spec.dtype, fwd, serve)
        self.fwd, self.n, self.T, self.B = fwd, n, T, B
        # BLAS runs the input products of more than four rows (see _columns._input_rows),
        # held at one thread meanwhile; a stream's step calls none, and holding it (two
        # thread-count changes) was most of a step's 12 us at H = 32
        self.blas = T * B > 4
        I, H, L, dt = spec.in_sizes[0], spec.H, spec.L, spec.dtype
        self.x = aligned_zeros((T, B, I), dt)
        self.y = aligned_zeros((T, B, H), dt)
        inter = aligned_zeros((min(L - 1, 2), T, B, H), dt)
        if carry is None:
            self.h0, self.c0 = aligned_zeros((L, B, H), dt), aligned_zeros((L, B, H), dt)
            self.h_n, self.c_n = aligned_zeros((L, B, H), dt), aligned_zeros((L, B, H), dt)
        else:
            self.h0, self.c0 = self.h_n, self.c_n = carry
        self.lengths = np.full(B, T, np.int64)
        self.sync = np.zeros((n + 1) * SYNC_STRIDE, np.int64)
        w = flat_params if weights is None else weights
        opts = int(spec.opts & EXACT != 0) | (2 if spec.opts & BIAS else 0)
        widest, R = max(I, H), self.WIDE_ROWS if bf16 else 0
        ranges = unit_ranges(H, n, dt.itemsize)
        NR = panel_width(dt.itemsize)
        # the recurrent products packed (see _columns_forward): where a thread's W_hh stays
        # in L2, for B >= 2 over enough steps to repay packing it (220 us at H = 256); at
        # B = 1 (a step 9.1 -> 6.8 us at H = 256) and over fewer steps only where the
        # packing is kept for later calls (at T = 32 packed every call: 0.34 -> 0.53 ms).
        # bfloat16 weights from B = 2, widened as they are packed: in L2 the product is
        # bound by arithmetic, not by bytes (Inference.forward, H = 256, T = 150, row dots
        # / panels, alternated: B = 2 1.15-1.30x, B = 4 0.99-1.89x; B = 1 0.84-1.14x)
        self.panels = ((not bf16 or B >= 2) and (kept or B >= 2 and T >= self.PANEL_STEPS) and all(
            4 * (j1 - j0) % NR == 0 and 4 * (j1 - j0) * H * dt.itemsize <= self.PANEL_BYTES
            for j0, j1 in ranges))
        if self.panels:
            opts |= PANELS
        self.args = []
        for k, (j0, j1) in enumerate(ranges):
            hk = j1 - j0
            meta = np.array([T, B, I, H, L, k, n, j0, j1, opts] + list(spec.offsets)
                            + [spec.offsets[-1] + spec.pblocks[-1].size], np.int64)
            pk = L * 4 * hk * H if self.panels else 0
            part = max(R * T * B, 4 * hk * B if self.panels else 0)
            self.args.append((w, flat_params, self.x, self.y, inter, self.h0, self.c0,
                              self.h_n, self.c_n, aligned_zeros((4, T * B, hk), dt),
                              aligned_zeros(part, dt), aligned_zeros((4, B, hk), dt),
                              aligned_zeros((B, hk), dt), aligned_zeros((R, widest), dt),
                              aligned_zeros(pk, dt), self.sync, meta, self.lengths,
                              spec.clip))
        self.jobs = []
        for args in self.args[1:]:
            number = new_job()
            self.jobs.append((number, lambda cell, spins, a=args, m=number:
                              serve(cell, spins, m, *a)))
        self.out = (readonly(self.y), (readonly(self.h_n), readonly(self.c_n)))
        self.packed = None      # the weights' version the panels hold (see forward)

    def forward(self, xt, h0, c0, lengths, version=None):
        """The forward of time-major x (T, B, I) from (h0, c0) (None: zeros), over
        `lengths` (None: all T); returns y (T, B, H) and (h_n, c_n) (L, B, H), read-only
        views of this plan's buffers. None when the servers are another thread's.

        version: None, or a number that changes whenever the weights do (fastlstm.Inference
        's refresh): the panels packed for a version are used again while it holds."""
        if self.panels:
            again = version is not None and version == self.packed
            for args in self.args:
                meta = args[-3]
                meta[_OPTS] = meta[_OPTS] | PACKED if again else meta[_OPTS] & ~PACKED
            self.packed = None
        np.copyto(self.x, xt, casting="same_kind")
        for src, dst in ((h0, self.h0), (c0, self.c0)):
            if src is None:
                dst.fill(0)
            else:
                np.copyto(dst, src, casting="same_kind")
        if lengths is None:
            self.lengths.fill(self.T)
        else:
            np.copyto(self.lengths, lengths)
        if not self.run():
            return None
        if self.panels:
            self.packed = version
        return self.out

    def run(self):
        """The kernels on what the buffers hold; False (nothing run) when the servers
        are another thread's."""
        if self.n == 1:
            self.fwd(*self.args[0])
        else:
            servers = take_servers(self.n - 1)
            if servers is None:
                release_servers()
                return False
            try:
                token = object() if self.blas else None
                try:
                    if self.blas:
                        enter_single_threaded_blas(token)
                    for server, job in zip(servers, self.jobs):
                        server.post(*job, FORWARD)
                    self.fwd(*self.args[0])
                finally:
                    _inside.discard(token)
                    for server in servers:
                        server.wait(server.posted())
                    if self.blas:
                        leave_single_threaded_blas()
            finally:
                release_servers()
        self.sync[self.n * SYNC_STRIDE] += self.T * self.h0.shape[0]
        return True


class ColumnTrainPlan(Last):
    """A training forward (what backward reads kept) and its backward split by hidden
    units over n threads (see _columns_train), made once per x shape: thread 0 runs here,
    the others on the servers, which meet at a barrier in compiled code once per step.
    One direction, no projection, no variant but the cell clip, full lengths; the layers
    run one after the other (each a call of the kernels), dropout's masks applied between
    them here."""

    def __init__(self, spec, T, B, n):
        ensure(spec.dtype, columns_train, serve_columns_train)
        H, L, dt = spec.H, spec.L, spec.dtype
        self.spec, self.n = spec, n
        self.sync = np.zeros((n + 1) * SYNC_STRIDE, np.int64)
        opts = int(spec.opts & EXACT != 0) | (2 if spec.opts & BIAS else 0)
        self.ranges = unit_ranges(H, n, dt.itemsize)
        NR = panel_width(dt.itemsize)
        self.layers = []
        for layer in range(L):
            I = spec.in_sizes[layer]
            lay = {"x": aligned_zeros((T, B, I), dt),
                   "h": aligned_zeros((T + 1, B, H), dt),    # h0, then h_t: shared
                   "dy": aligned_zeros((T, B, H), dt), "dx": aligned_zeros((T, B, I), dt),
                   "cells": [], "args": []}
            for name in ("c_n", "dh0", "dc0", "dh_n", "dc_n"):
                lay[name] = aligned_zeros((1, B, H), dt)
            part = aligned_zeros((2, n, B, H), dt)
            dxp = aligned_zeros((n, T * B, I), dt)
            for k, (j0, j1) in enumerate(self.ranges):
                hk = j1 - j0
                meta = np.array([T, B, I, H, k, n, j0, j1, opts], np.int64)
                c = aligned_zeros((T + 1, B, hk), dt)
                lay["cells"].append(c)
                lay["args"].append((
                    spec.pblocks[layer], spec.gblocks[layer], lay["x"], lay["h"], lay["dy"],
                    lay["dx"], lay["c_n"], lay["dh0"], lay["dc0"], lay["dh_n"], lay["dc_n"],
                    aligned_zeros((T, B, 4 * hk), dt), c, aligned_zeros((T, B, hk), dt),
                    aligned_zeros((4 * hk, I), dt), aligned_zeros((4 * hk, H), dt),
                    aligned_zeros(4 * hk, dt), aligned_zeros((4 * hk // NR, H, NR), dt),
                    aligned_zeros((H // NR, 4 * hk, NR), dt), aligned_zeros((B, 4 * hk), dt),
                    aligned_zeros((T, B, 4 * hk), dt), aligned_zeros((B, hk), dt),
                    aligned_zeros((B, hk), dt), aligned_zeros((B, hk), dt), part, dxp,
                    aligned_zeros((4 * hk, I), dt), aligned_zeros((4 * hk, H), dt),
                    self.sync, meta, spec.clip))
            lay["jobs"] = []
            for args in lay["args"][1:]:
                number = new_job()
                lay["jobs"].append((number, lambda cell, spins, a=args, m=number:
                                    serve_columns_train(cell, spins, m, *a)))
            self.layers.append(lay)
        self.x, self.dy = self.layers[0]["x"], self.layers[-1]["dy"]
        self.h_n, self.c_n = aligned_zeros((L, B, H), dt), aligned_zeros((L, B, H), dt)
        self.dh0, self.dc0 = aligned_zeros((L, B, H), dt), aligned_zeros((L, B, H), dt)
        bf = spec.batch_first
        y, dx = self.layers[-1]["h"][1:], self.layers[0]["dx"]
        self.out = (readonly(y.transpose(1, 0, 2) if bf else y),
                    (readonly(self.h_n), readonly(self.c_n)))
        self.grad_out = (readonly(dx.transpose(1, 0, 2) if bf else dx),
                         (readonly(self.dh0), readonly(self.dc0)))
        self.dy_shape = self.out[0].shape
        Last.__init__(self, T, B, np.full(B, T, np.int64), [None] * L, {}, None)

    @staticmethod
    def fits(spec, n):
        """Whether the kernels take this layer split n ways: whole panels of each share."""
        NR = panel_width(spec.dtype.itemsize)
        return n > 1 and spec.H % NR == 0 and all(
            4 * (j1 - j0) % NR == 0 and j1 > j0
            for j0, j1 in unit_ranges(spec.H, n, spec.dtype.itemsize))

    def forward(self, xt, h0=None, c0=None, masks=None):
        """The forward of time-major x (T, B, I) from (h0, c0) (L, B, H) (None: zeros),
        with dropout's masks (T, B, H) on the layers' outputs below the last (None: none):
        y and (h_n, c_n), read-only views of this plan's buffers; None when the servers
        are another thread's (nothing run)."""
        servers = take_servers(self.n - 1)
        if servers is None:
            release_servers()
            return None
        try:
            masks = [None] * len(self.layers) if masks is None else masks
            np.copyto(self.x, xt, casting="same_kind")
            for layer, lay in enumerate(self.layers):
                if layer:
                    below, mask = self.layers[layer - 1]["h"][1:], masks[layer - 1]
                    if mask is None:
                        np.copyto(lay["x"], below)
                    else:
                        np.multiply(below, mask, out=lay["x"])
                if h0 is None:
                    lay["h"][0].fill(0)
                else:
                    np.copyto(lay["h"][0], h0[layer], casting="same_kind")
                for c, (j0, j1) in zip(lay["cells"], self.ranges):
                    if c0 is None:
                        c[0].fill(0)
                    else:
                        np.copyto(c[0], c0[layer][:, j0:j1], casting="same_kind")
                self._call(servers, lay, FORWARD)
                self.h_n[layer], self.c_n[layer] = lay["h"][self.T], lay["c_n"][0]
        finally:
            release_servers()
        self.masks = masks
        return self.out

    def backward(self, dy, dh_n=None, dc_n=None):
        """dx and (dh0, dc0) of the last forward, read-only views of this plan's buffers;
        the weight gradients added into the model's; None when the servers are another
        thread's (nothing run)."""
        servers = take_servers(self.n - 1)
        if servers is None:
            release_servers()
            return None
        try:
            np.copyto(self.dy, dy, casting="same_kind")
            for layer in range(len(self.layers) - 1, -1, -1):
                lay = self.layers[layer]
                for src, dst in ((dh_n, lay["dh_n"]), (dc_n, lay["dc_n"])):
                    if src is None:
                        dst.fill(0)
                    else:
                        np.copyto(dst[0], src[layer], casting="same_kind")
                if layer < len(self.layers) - 1:
                    above, mask = self.layers[layer + 1]["dx"], self.masks[layer]
                    if mask is None:
                        np.copyto(lay["dy"], above)
                    else:
                        np.multiply(above, mask, out=lay["dy"])
                self._call(servers, lay, BACKWARD)
                self.dh0[layer], self.dc0[layer] = lay["dh0"][0], lay["dc0"][0]
        finally:
            release_servers()
        return self.grad_out

    def _call(self, servers, lay, cmd):
        """One layer's command on every thread: the servers' shares posted, thread 0's
        run here; returns when all are done."""
        token = object()
        try:
            enter_single_threaded_blas(token)
            for server, job in zip(servers, lay["jobs"]):
                server.post(*job, cmd)
            columns_train(cmd, *lay["args"][0])
        finally:
            _inside.discard(token)
            for server in servers:
                server.wait(server.posted())
            leave_single_threaded_blas()
        self.sync[self.n * SYNC_STRIDE] += self.T + (cmd == BACKWARD)
