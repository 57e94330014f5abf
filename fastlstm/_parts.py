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
    ONE_THREAD,
    PADDED,
    ZERO_STATE,
    layer_backward,
    layer_forward,
    reverse_in_time,
    zero_padding,
)
from ._shared import Buffers, readonly
from ._threads import parallel_worthwhile, run_pair

__all__ = ["Spec", "Part", "Workspace", "rows"]


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

    def forward(self, xt, h0, c0, lens, padded, masks, vmasks, pairs=False, one_thread=True):
        """one_thread: each kernel call has one thread (BLAS too), so its products may
        run packed (see _gemm); a pair of directions run at once always has."""
        m = self.spec
        # each entry only where it is called: loading one from the cache takes 20-40 ms
        ensure(m.dtype, layer_forward)
        if m.D == 2:
            ensure(m.dtype, reverse_in_time)
        if padded:
            ensure(m.dtype, zero_padding)
        T, B = xt.shape[:2]
        L, D, H, P = m.L, m.D, m.H, m.P
        src = xt
        for k in range(L):
            outs, calls = [], []
            paired = self._paired(D, T * B * 4 * H * (m.in_sizes[k * D] + P), pairs)
            one = ONE_THREAD if one_thread or paired else 0
            for d in range(D):
                j = k * D + d
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
            if D == 1:
                out = outs[0]
            else:
                out = self.buf.get(f"out{k}", (T, B, 2 * P))
                out[:, :, :P] = outs[0]
                reverse_in_time(outs[1], out[:, :, P:], lens)
            if masks[k] is not None:
                src = self.buf.get(f"dropped{k}", out.shape)
                np.multiply(out, masks[k], out=src)
            else:
                src = out
        if L * D == 1:
            v = self.views(0, T, B)
            return out, v["h_n"], v["c_n"]
        h_n = self.buf.get("h_n", (L * D, B, P))
        c_n = self.buf.get("c_n", (L * D, B, H))
        for j in range(L * D):
            v = self.views(j, T, B)
            h_n[j], c_n[j] = v["h"][T], v["c"][T]
        return out, h_n, c_n

    def backward(self, grad, dh_n, dc_n, lens, masks, pairs=False, one_thread=True):
        m = self.spec
        ensure(m.dtype, layer_backward)
        if m.D == 2:
            ensure(m.dtype, reverse_in_time)
        T, B = grad.shape[:2]
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
                calls.append(partial(layer_backward, m.pblocks[j], self.gblock(j),
                                     self.ws[j].flat, lens, m.clip, T, B, m.in_sizes[j], H,
                                     P, m.opts | (ZERO_STATE if dh_n is None else 0) | one))
            self._run(calls, paired)
            if not single:
                for d in range(D):
                    v = self.views(k * D + d, T, B)
                    dh0[k * D + d], dc0[k * D + d] = v["dh"], v["dc"]
            if D == 1:
                dx = self.views(k * D, T, B)["dx"]
            else:
                dx = self.buf.get(f"dx{k}", self.views(k * D, T, B)["dx"].shape)
                reverse_in_time(self.views(k * D + 1, T, B)["dx"], dx, lens)
                dx += self.views(k * D, T, B)["dx"]
            if k > 0 and masks[k - 1] is not None:
                grad = self.buf.get(f"dmasked{k}", dx.shape)
                np.multiply(dx, masks[k - 1], out=grad)
            else:
                grad = dx
        if single:
            v = self.views(0, T, B)
            dh0, dc0 = v["dh0"], v["dc0"]
        return grad, dh0, dc0


