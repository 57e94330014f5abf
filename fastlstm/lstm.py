"""The public LSTM: validates, owns the buffers, calls the kernels."""
import math
import re
import threading
from functools import partial

import numpy as np

from . import _layout
from . import _validate as check
from ._config import exact_activations
from ._kernels import (
    ONE_THREAD,
    PADDED,
    ZERO_STATE,
    layer_backward,
    layer_forward,
    opts_bits,
    reverse_in_time,
    rows_backward,
    rows_forward,
    serve_rows,
    zero_padding,
)
from ._shared import Buffers, OneThread, aligned_empty, aligned_zeros, readonly
from ._spin import BACKWARD, FORWARD
from ._threads import (
    SPLIT_WORK,
    _inside,
    batch_parts,
    enter_single_threaded_blas,
    leave_single_threaded_blas,
    new_job,
    parallel_worthwhile,
    release_servers,
    run_pair,
    run_parts,
    single_threaded,
    take_servers,
)

__all__ = ["LSTM"]


class _Workspace:
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


class _Last:
    """What backward differentiates: the last forward's shape, lengths, dropout
    masks, and the thread that ran it. A plan is its own record (these fields, and
    the model's ``_last`` the plan itself): a record that referred back to its plan
    made a cycle, which kept a dropped plan and its workspace alive until the cyclic
    collector came by (T changing every step piled up gigabytes)."""

    def __init__(self, T, B, lengths, masks, vmasks, split, one_thread=True):
        self.T, self.B, self.lengths, self.masks, self.split = T, B, lengths, masks, split
        self.vmasks, self.one_thread = vmasks, one_thread
        self.thread = threading.get_ident()


class _Plan(_Last):
    """A repeated call, made once: a one-layer, one-direction, one-part model called at
    one x shape without state or lengths. It holds the kernels' arguments, the
    workspace's x and dy and the views a call returns, so that a call is a copy, the
    kernel and a return; at seed size, building these each call was two thirds of a
    forward+backward. Plans are dropped when the workspace or the parameters move."""

    def __init__(self, model, T, B, split):
        part = model._part(0)
        v = part.views(0, T, B)
        ws, bf = part.ws[0], model.batch_first
        lens = model._full_lengths[(T, B)]
        sizes = (lens, model._clip, T, B, model.input_size, model.hidden_size, model._P,
                 model._opts | ZERO_STATE | ONE_THREAD)
        self.ws, self.lens, self.sizes = ws.flat, lens, sizes
        self.fargs = (model._pblocks[0], ws.flat) + sizes
        self.bargs = (model._pblocks[0], part.gblock(0), ws.flat) + sizes
        self.x, self.dy = (v["x"], v["dy"]) if not bf else (
            v["x"].transpose(1, 0, 2), v["dy"].transpose(1, 0, 2))
        self.out = (ws.readonly(T, B, "h_out", bf), (ws.readonly(T, B, "h_n"),
                                                      ws.readonly(T, B, "c_n")))
        self.grad_out = (ws.readonly(T, B, "dx", bf), (ws.readonly(T, B, "dh0"),
                                                        ws.readonly(T, B, "dc0")))
        _Last.__init__(self, T, B, lens, [None], {}, split)


#: split plans (with their own y, dx buffers) an LSTM keeps, the most recent shapes'
MAX_SPLIT_PLANS = 8


class _SplitPlan(_Last):
    """A repeated call split across threads, made once: as _Plan, for a shape whose
    batch is split into parts (see _threads). Part 0 runs here as one kernel call that
    copies its rows in and out (_kernels.rows_forward); each other part runs on a server
    thread that waits for it in compiled code (_threads.Server, _kernels.serve_rows),
    its rows of x or dy copied into its workspace here first. So neither thread waits on
    the other's Python or on a wake-up: at small size (float32) a forward's wall time
    beyond part 0's kernel went from about 130 us (the pool's hand-off) to 50-80 us.
    Taken while the model would split the batch the same way, and for x and dy of the
    model's dtype; when another thread holds the servers, the parts go to the thread
    pool instead."""

    def __init__(self, model, T, B, split):
        self.m, self.split = model, split
        P, H = model._P, model.hidden_size
        dt = model.dtype
        self.y = aligned_empty((T, B, P), dt)
        self.h_n, self.c_n = aligned_empty((1, B, P), dt), aligned_empty((1, B, H), dt)
        self.dx = aligned_empty((T, B, model.input_size), dt)
        self.dh0, self.dc0 = aligned_empty((1, B, P), dt), aligned_empty((1, B, H), dt)
        lens = model._full_lengths[(T, B)]
        self.parts, self.jobs = [], []
        for part, b0, b1 in split:
            v = part.views(0, T, b1 - b0)            # its workspace, allocated now
            sizes = (lens[b0:b1], model._clip, T, b1 - b0, model.input_size, H, P,
                     model._opts | ZERO_STATE | ONE_THREAD)
            self.parts.append((part, b0, b1, v, sizes))
        for part, b0, _, _, sizes in self.parts[1:]:
            number = new_job()
            args = (number, model._pblocks[0], part.gblock(0), part.ws[0].flat, self.y,
                    self.h_n, self.c_n, self.dx, self.dh0, self.dc0, b0) + sizes
            self.jobs.append((number, lambda cell, spins, args=args:
                              serve_rows(cell, spins, *args)))
        bf = model.batch_first
        self.out = (readonly(self.y.transpose(1, 0, 2) if bf else self.y),
                    (readonly(self.h_n), readonly(self.c_n)))
        self.grad_out = (readonly(self.dx.transpose(1, 0, 2) if bf else self.dx),
                         (readonly(self.dh0), readonly(self.dc0)))
        self.dy_shape = self.out[0].shape
        self.copies = {}                  # "x", "dy": read-only inputs copied (_writable)
        _Last.__init__(self, T, B, lens, [None], {}, split)

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
        m = self.m
        xt = self._writable(m._time_major(x), "x")
        self._run(xt, "x", FORWARD, lambda part, b0, sizes: rows_forward(
            m._pblocks[0], part.ws[0].flat, xt, self.y, self.h_n, self.c_n, b0, *sizes))
        return self.out

    def backward(self, dy):
        m = self.m
        dyt = self._writable(m._time_major(dy), "dy")

        def call(part, b0, sizes):
            if part is not self.parts[0][0]:          # the pool's way: the others' sums
                part.flat_grads.fill(0)
            rows_backward(m._pblocks[0], part.gblock(0), part.ws[0].flat, dyt, self.dx,
                          self.dh0, self.dc0, b0, *sizes)
        self._run(dyt, "dy", BACKWARD, call)
        for part, _, _, _, _ in self.parts[1:]:      # in order: the same sum every time
            m.flat_grads += part.flat_grads
        return self.grad_out


#: how each optional parameter's option is spelled, for error messages
_OPTION_SPELLING = {"bias": "bias=True", "proj": "proj_size > 0", "peephole": "peephole=True",
                    "layer_norm": "layer_norm=True"}


def _options_of(keys, lead):
    """'; <lead> peephole=True, ...' for the options the parameter names belong to."""
    when = {name: w for name, _, w in _layout.PARAMS}
    bases = [re.sub(r"_l\d+(_reverse)?$", "", k) for k in keys]
    opts = sorted({_OPTION_SPELLING[when[b]] for b in bases if when.get(b)})
    return f"; {lead} {', '.join(opts)}" if opts else ""


def _rows(state, cut):
    """A state's batch slice, or None."""
    return None if state is None else state[:, cut]


class _Part:
    """The buffers of one part of the batch: a workspace per (layer, direction),
    scratch arrays, and where its weight gradients go. It runs the layers over its
    sequences; the model splits the batch and joins the parts' results."""

    def __init__(self, model, flat_grads):
        self.m = model
        self.flat_grads = flat_grads
        self.ws = [None] * len(model._blocks)
        self.buf = Buffers(model.dtype)

    def gblock(self, j):
        if self.flat_grads is None:
            return self.m._gblocks[j]
        o, n, _ = self.m._blocks[j]
        return self.flat_grads[o:o + n]

    def views(self, j, T, B):
        ws = self.ws[j]
        if ws is None or not ws.fits(T, B):
            T_cap = T if ws is None else max(T, ws.T)
            B_cap = B if ws is None else max(B, ws.B)
            ws = self.ws[j] = _Workspace(T_cap, B_cap, self.m._blocks[j][2], self.m.hidden_size,
                                         self.m._P, self.m._wflags, self.m.dtype)
            self.m._plans.clear()          # they hold the old workspace
        return ws.views(T, B)

    def _paired(self, D, work, pairs):
        """Whether a layer's two directions run at once, one thread each: when that pays
        and this part has the machine to itself (see _threads)."""
        return D == 2 and pairs and parallel_worthwhile(work, self.m.threads)

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
        m = self.m
        T, B = xt.shape[:2]
        L, D, H, P = m.num_layers, m.num_directions, m.hidden_size, m._P
        src = xt
        for k in range(L):
            outs, calls = [], []
            paired = self._paired(D, T * B * 4 * H * (m._blocks[k * D][2] + P), pairs)
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
                calls.append(partial(layer_forward, m._pblocks[j], self.ws[j].flat, lens,
                                     m._clip, T, B, m._blocks[j][2], H, P,
                                     m._opts | (PADDED if padded else 0)
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
        m = self.m
        T, B = grad.shape[:2]
        L, D, H, P = m.num_layers, m.num_directions, m.hidden_size, m._P
        single = L * D == 1
        if not single:
            dh0 = self.buf.get("dh0", (L * D, B, P))
            dc0 = self.buf.get("dc0", (L * D, B, H))
        for k in range(L - 1, -1, -1):
            calls = []
            paired = self._paired(D, T * B * 4 * H * (m._blocks[k * D][2] + P), pairs)
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
                calls.append(partial(layer_backward, m._pblocks[j], self.gblock(j),
                                     self.ws[j].flat, lens, m._clip, T, B, m._blocks[j][2], H,
                                     P, m._opts | (ZERO_STATE if dh_n is None else 0) | one))
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


class LSTM:
    """A multi-layer, optionally bidirectional LSTM with torch.nn.LSTM's meaning.

    Gate order (i, f, g, o), parameter names and shapes follow ``torch.nn.LSTM``
    (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``,
    ``weight_hr_l{k}``, each with ``_reverse`` for the backward direction), so
    ``{k: v.numpy() for k, v in torch_lstm.state_dict().items()}`` loads as it
    is. All parameters live in one flat buffer ``flat_params`` and all gradients
    in ``flat_grads``; ``params`` and ``grads`` map torch's names to views.

    Parameters
    ----------
    input_size, hidden_size : int
    num_layers : int
        Stacked layers; layer k > 0 reads layer k-1's output.
    bias : bool
        False drops both biases.
    batch_first : bool
        x and y are (B, T, features) instead of (T, B, features).
    dropout : float in [0, 1)
        On the outputs of every layer but the last, in training mode only.
    bidirectional : bool
    proj_size : int
        > 0 projects each hidden state to proj_size (torch's LSTMP).
    dtype : float32 or float64
        The dtype of the parameters and of every computation. Floating inputs
        of another dtype are cast to it; non-floating inputs are refused.
    seed : int or None
        Seeds the initialisation U(-1/sqrt(H), 1/sqrt(H)), as torch's, and the
        dropout masks.
    forget_bias : float
        Added to the forget gate's ``bias_ih`` at initialisation (Keras'
        ``unit_forget_bias`` is 1.0). Needs ``bias=True``.
    cell_clip : float or None
        Clip every c_t to [-cell_clip, cell_clip] (as TF's LSTMCell); the
        gradient through a clipped cell is zero.
    peephole : bool
        Peephole connections (Gers et al. 2002; ONNX's ``P``): ``i`` and ``f``
        see ``weight_ci * c_{t-1}``, ``weight_cf * c_{t-1}``, and ``o`` sees
        ``weight_co * c_t``. Parameters ``weight_c{i,f,o}_l{k}`` (hidden_size,),
        initialised as the other weights.
    layer_norm : bool
        Layer normalisation (Ba et al. 2016, as haste's LayerNormLSTM) of
        ``W_ih x_t`` and ``W_hh h_{t-1}`` over their 4H features, and of the
        cell before its tanh (the carried cell is not normalised). Parameters
        ``ln_ih_weight/bias_l{k}``, ``ln_hh_weight/bias_l{k}`` (4H,) and
        ``ln_c_weight/bias_l{k}`` (H,), gains 1 and biases 0 at initialisation.
    zoneout, zoneout_cell : float in [0, 1)
        Zoneout (Krueger et al. 2017) of h and of c: in training each unit keeps
        its previous value with this probability, drawn per step and unit; in
        evaluation ``h_t = p h_{t-1} + (1 - p) h~_t`` (and so for c).
    recurrent_dropout : float in [0, 1)
        Dropout on ``h_{t-1}`` before ``W_hh`` (Gal & Ghahramani 2016, Keras'
        ``recurrent_dropout``): one mask per sequence and layer direction, the
        same at every step, scaled by 1/(1-p); the identity in evaluation.
    threads : int or None
        Threads a call may use: the batch is split into that many parts, each run
        on its own thread with single-threaded BLAS, when the work pays for it.
        None: the cores this process may use, capped by a threadpoolctl limit on
        BLAS in force at the call. Results are bitwise repeatable for a fixed
        count; another count changes the last bits (the order of sums).

    Notes
    -----
    Buffers are sized on the first call for its (T, B) and reused; a larger T or
    B grows them once. The arrays ``forward`` and ``backward`` return are
    read-only views into these buffers, valid until the next call: copy them to
    keep them. One model serves one thread at a time: a call that overlaps a
    running one from another thread raises ``RuntimeError``; separate models
    share nothing and run in parallel (the kernels release the GIL).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype=np.float32, seed=None,
                 forget_bias=0.0, cell_clip=None, threads=None, peephole=False,
                 layer_norm=False, zoneout=0.0, zoneout_cell=0.0, recurrent_dropout=0.0):
        config = check.layer_config(
            input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
            dropout=dropout, bidirectional=bidirectional, proj_size=proj_size, dtype=dtype,
            seed=seed, forget_bias=forget_bias, cell_clip=cell_clip, threads=threads,
            peephole=peephole, layer_norm=layer_norm, zoneout=zoneout, zoneout_cell=zoneout_cell,
            recurrent_dropout=recurrent_dropout)
        for k, v in config.items():
            setattr(self, k, v)
        self.training = True

        H, D = self.hidden_size, self.num_directions
        P = self.proj_size or H
        self._P = P
        what = (f"the parameters and gradients of LSTM(input_size={self.input_size}, "
                f"hidden_size={H}, num_layers={self.num_layers}"
                + (", bidirectional=True" if self.bidirectional else "")
                + (f", proj_size={self.proj_size}" if self.proj_size else "") + ")")
        flags = (self.bias, bool(self.proj_size), self.peephole, self.layer_norm)
        # the workspace's options (_layout.WORKSPACE_FLAGS)
        self._wflags = (self.layer_norm, bool(self.zoneout or self.zoneout_cell),
                        self.recurrent_dropout > 0)
        total = D * (_layout.param_size(self.input_size, H, P, *flags)
                     + (self.num_layers - 1) * _layout.param_size(D * P, H, P, *flags))
        check.affordable(2 * total, self.dtype, what)     # before any list of that size is built
        # per (layer, direction): (offset, size, input size); (name, shape) of every parameter
        self._blocks, self._layout = _layout.layer_blocks(self.input_size, H, P,
                                                          self.num_layers, D, *flags)
        offset = sum(size for _, size, _ in self._blocks)
        self.bind(check.allocate(offset, self.dtype, what), aligned_zeros(offset, self.dtype))
        bound = 1.0 / math.sqrt(H)
        self.flat_params[:] = np.random.default_rng(self.seed).uniform(-bound, bound, offset)
        for name, a in self.params.items():
            if name.startswith("bias_ih") and self.forget_bias:
                a[H:2 * H] += self.forget_bias
            elif name.startswith("ln_"):           # layer norm: gain 1, bias 0
                a[:] = 1.0 if "_weight_" in name else 0.0
        self._rng = np.random.default_rng(None if self.seed is None else [self.seed, 1])
        self._clip = self.dtype.type(np.inf if self.cell_clip is None else self.cell_clip)
        self._exact = exact_activations()
        # the kernels' options, as the bits of one integer (see _kernels.opts_bits)
        self._opts = opts_bits(bias=self.bias, proj=bool(self.proj_size), peephole=self.peephole,
                               layer_norm=self.layer_norm, zoneout=self._wflags[1],
                               rdrop=self._wflags[2], exact=self._exact)
        self._parts = []       # per part of the batch: workspaces and scratch (_Part)
        self._buf = Buffers(self.dtype)
        self._full_lengths = {}
        self._affordable = set()
        self._splits = {}
        self._plans = {}       # x.shape -> _Plan or _SplitPlan
        self._last = None
        self._guard = OneThread("LSTM")

    def bind(self, flat_params, flat_grads):
        """Move the parameters and gradients into the given flat arrays (e.g. a
        larger model's buffers, so that one optimizer pass covers both), keeping
        their values; ``params`` and ``grads`` become views into them."""
        n = sum(size for _, size, _ in self._blocks)
        for name, a in (("flat_params", flat_params), ("flat_grads", flat_grads)):
            check.float_array(name, a, self.dtype)
            if a.dtype != self.dtype or a.shape != (n,) or not a.flags.c_contiguous:
                raise ValueError(f"{name} must be a contiguous {self.dtype} array of shape "
                                 f"({n},), got {a.dtype}{a.shape}")
        if getattr(self, "flat_params", None) is not None:
            flat_params[:] = self.flat_params
            flat_grads[:] = self.flat_grads
        self.flat_params, self.flat_grads = flat_params, flat_grads
        self.params = _layout.carve(flat_params, self._layout)
        self.grads = _layout.carve(flat_grads, self._layout)
        # The kernels take one direction of one layer as one flat slice.
        self._pblocks = [flat_params[o:o + k] for o, k, _ in self._blocks]
        self._gblocks = [flat_grads[o:o + k] for o, k, _ in self._blocks]
        self._plans = {}

    def get_rng_state(self):
        """The dropout generator's state (a dict, JSON-serialisable), for checkpoints."""
        return self._rng.bit_generator.state

    def set_rng_state(self, state):
        """Restore a state returned by ``get_rng_state``."""
        self._rng.bit_generator.state = state

    @property
    def last_lengths(self):
        """The int64 lengths (B,) of the last forward (T for every sequence when
        none were given); None before the first forward."""
        return None if self._last is None else self._last.lengths

    @property
    def output_size(self):
        """Features of each step of y: D * (proj_size or hidden_size)."""
        return self.num_directions * self._P

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    #: the constructor's options after the two sizes, with their defaults
    OPTIONS = (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
               ("bidirectional", False), ("proj_size", 0), ("forget_bias", 0.0),
               ("cell_clip", None), ("peephole", False), ("layer_norm", False),
               ("zoneout", 0.0), ("zoneout_cell", 0.0), ("recurrent_dropout", 0.0))

    def config(self):
        """The validated constructor arguments as plain Python values (JSON-ready):
        ``LSTM(**m.config())`` builds the same model."""
        return dict(input_size=self.input_size, hidden_size=self.hidden_size,
                    **{k: getattr(self, k) for k, _ in self.OPTIONS},
                    dtype=self.dtype.name, seed=self.seed)

    def __repr__(self):
        opts = [f"{self.input_size}", f"{self.hidden_size}"]
        opts += [f"{k}={getattr(self, k)!r}" for k, default in self.OPTIONS
                 if getattr(self, k) != default]
        return f"LSTM({', '.join(opts)}, dtype={self.dtype.name})"

    @property
    def last_masks(self):
        """The random masks of the last forward, for tests and inspection: a dict
        with "dropout" (per layer, the (T, B, D*P) mask on its output, or None
        where there was none), and, with those options, "zoneout_h" (L*D, T, B, P) and
        "zoneout_c" (L*D, T, B, H) (1 where a unit kept its previous value; the
        probability in evaluation) and "recurrent" (L*D, B, P) (0 or 1/(1-p); 1 in
        evaluation). Index j = layer * D + direction; a reverse direction's step s
        is its own s-th step (the sequence's own steps last first). Read-only views,
        valid until the next call; None before the first forward."""
        if self._last is None:
            return None
        out = {"dropout": [None if a is None else readonly(a) for a in self._last.masks]}
        names = {"zh": "zoneout_h", "zc": "zoneout_c", "rmask": "recurrent"}
        out.update({names[k]: readonly(a) for k, a in self._last.vmasks.items()})
        return out

    def train(self, mode=True):
        """Training mode: dropout, zoneout's and recurrent dropout's masks are
        applied. Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode: dropout is the identity. Returns self."""
        return self.train(False)

    # -- buffers -----------------------------------------------------------

    def _state(self, name, state, B):
        """Validated (h, c), shapes (D*L, B, P) and (D*L, B, H), or (None, None)."""
        if state is None:
            return None, None
        h, c = check.pair(name, state)
        n = self.num_directions * self.num_layers
        for part, a, size in ((f"{name}[0] (h)", h, self._P),
                              (f"{name}[1] (c)", c, self.hidden_size)):
            check.float_array(part, a, self.dtype)
            check.shape(part, a, (n, B, size))
        return h, c

    def _time_major(self, a):
        return a.transpose(1, 0, 2) if self.batch_first else a

    def _part(self, r):
        """Part r of the batch's buffers; part 0 adds into ``flat_grads`` itself, the
        others into gradient buffers of their own, summed after the backward."""
        while len(self._parts) <= r:
            own = len(self._parts) > 0
            grads = aligned_zeros(self.flat_grads.size, self.dtype) if own else None
            self._parts.append(_Part(self, grads))
        return self._parts[r]

    # -- forward / backward ------------------------------------------------

    def _split(self, T, B):
        """[(part, first, end)] over the batch: one part per thread when the work
        pays for the hand-off, else the whole batch as part 0 (see _threads)."""
        n = batch_parts(self.threads, B, T * B * 4 * self.hidden_size
                        * (self._blocks[0][2] + self._P) * self.num_layers)
        key = (n, B)
        split = self._splits.get(key)          # cached: small calls cannot spare building it
        if split is None:
            split = self._splits[key] = [(self._part(r), r * B // n, (r + 1) * B // n)
                                         for r in range(n)]
        return split

    def _variant_masks(self, T, B):
        """{workspace name: (L*D, ...) array} of zoneout's and recurrent dropout's
        masks for this call, drawn whole (after dropout's) so that they do not
        depend on how the batch is split; in evaluation, their expectations."""
        out = {}
        LD, H, P = self.num_layers * self.num_directions, self.hidden_size, self._P
        dt = self.dtype.type
        if self._wflags[1]:
            for name, p, size in (("zh", self.zoneout, P), ("zc", self.zoneout_cell, H)):
                a = out[name] = self._buf.get(name, (LD, T, B, size))
                if self.training and p > 0:      # 1: the unit keeps its previous value
                    self._rng.random(out=a, dtype=self.dtype)
                    np.less(a, dt(p), out=a)
                else:
                    a.fill(0 if self.training else p)
        if self._wflags[2]:
            a = out["rmask"] = self._buf.get("rmask", (LD, B, P))
            if self.training:
                self._rng.random(out=a, dtype=self.dtype)
                np.greater_equal(a, dt(self.recurrent_dropout), out=a)
                a /= dt(1.0 - self.recurrent_dropout)
            else:
                a.fill(1)
        return out

    def forward(self, x, state=None, lengths=None):
        """Run over whole sequences.

        Parameters
        ----------
        x : ndarray (T, B, input_size), or (B, T, input_size) with batch_first
        state : (h0, c0), optional
            h0 (D*num_layers, B, proj_size or hidden_size), c0 (D*num_layers, B,
            hidden_size); zeros when omitted.
        lengths : sequence of int, optional
            Sequence b uses steps [0, lengths[b]), in any order: its outputs past
            that are zero and its final state is taken at its own last step (as
            torch's packed sequences).

        Returns
        -------
        y : ndarray (T, B, D*H_out), or (B, T, D*H_out) with batch_first
        (h_n, c_n) : ndarrays (D*num_layers, B, H_out), (D*num_layers, B, hidden_size)
            Read-only views into the workspace, valid until the next call.
        """
        with self._guard("forward"):
            return self._forward(x, state, lengths)

    def _forward(self, x, state, lengths):
        check.float_array("x", x, self.dtype)
        if state is None and lengths is None:
            plan = self._plans.get(x.shape)        # a shape this model has run before
            if type(plan) is _Plan:
                np.copyto(plan.x, x, casting="same_kind")
                layer_forward(*plan.fargs)
                plan.thread = threading.get_ident()
                self._last = plan
                return plan.out
            if (type(plan) is _SplitPlan and x.dtype == self.dtype
                    and self._split(plan.T, plan.B) is plan.split):
                out = plan.forward(x)
                plan.thread = threading.get_ident()
                self._last = plan
                return out
        check.shape("x", x, ("B", "T", self.input_size) if self.batch_first
                    else ("T", "B", self.input_size))
        xt = self._time_major(x)
        T, B = xt.shape[:2]
        if T < 1 or B < 1:
            raise ValueError(f"x must have T >= 1 and B >= 1, got shape {x.shape}")
        h0, c0 = self._state("state", state, B)
        lens = check.lengths("lengths", lengths, B, T)
        if (T, B) not in self._affordable:       # once per shape: the arithmetic costs
            need = sum(_layout.workspace_size(T, B, I_k, self.hidden_size, self._P,
                                              *self._wflags)
                       for _, _, I_k in self._blocks)
            check.affordable(need, self.dtype, f"the workspace for T={T}, B={B} (x's shape)")
            self._affordable.add((T, B))
        padded = lens is not None
        if lens is None:
            lens = self._full_lengths.get((T, B))
            if lens is None:
                lens = self._full_lengths[(T, B)] = np.full(B, T, np.int64)
        L, D, H, P = self.num_layers, self.num_directions, self.hidden_size, self._P
        masks = [None] * L
        if self.training and self.dropout > 0 and L > 1:
            # drawn here, whole, so that the masks do not depend on how the batch is split
            keep, p = self.dtype.type(1.0 - self.dropout), self.dtype.type(self.dropout)
            for k in range(L - 1):
                mask = self._buf.get(f"mask{k}", (T, B, D * P))
                self._rng.random(out=mask, dtype=self.dtype)
                np.greater_equal(mask, p, out=mask)
                mask /= keep
                masks[k] = mask
        vmasks = self._variant_masks(T, B)
        split = self._split(T, B)
        one_thread = single_threaded(len(split), T * B * 4 * H * (self._blocks[0][2] + P) * L)
        if len(split) == 1:
            out, h_n, c_n = split[0][0].forward(xt, h0, c0, lens, padded, masks, vmasks,
                                                pairs=True, one_thread=one_thread)
        else:
            def run(part, cut):
                return part.forward(xt[:, cut], _rows(h0, cut), _rows(c0, cut), lens[cut],
                                    padded, [None if m is None else m[:, cut] for m in masks],
                                    {k: a[:, cut] if k == "rmask" else a[:, :, cut]
                                     for k, a in vmasks.items()})
            results = run_parts([partial(run, part, slice(b0, b1)) for part, b0, b1 in split])
            out = self._buf.get("y", (T, B, D * P))
            h_n = self._buf.get("h_n", (L * D, B, P))
            c_n = self._buf.get("c_n", (L * D, B, H))
            for (_, b0, b1), (o, h, c) in zip(split, results):
                out[:, b0:b1], h_n[:, b0:b1], c_n[:, b0:b1] = o, h, c
        self._last = _Last(T, B, lens, masks, vmasks, split, one_thread=one_thread)
        if state is None and not padded and L * D == 1 and not vmasks:
            if len(split) == 1 and (B < 2 or T * B * 4 * H * (self.input_size + P) < SPLIT_WORK):
                # the next call at this shape takes the plan (never split, whatever the threads)
                self._plans[x.shape] = _Plan(self, T, B, split)
            elif len(split) > 1:
                # a split plan owns its output buffers: keep the last few shapes' only,
                # so that a run over many shapes (e.g. varying T) does not pile them up
                held = [k for k, p in self._plans.items() if type(p) is _SplitPlan]
                for k in held[:max(len(held) - MAX_SPLIT_PLANS + 1, 0)]:
                    del self._plans[k]
                self._plans[x.shape] = _SplitPlan(self, T, B, split)
        if len(split) == 1 and L * D == 1:      # the workspace's own, cached read-only views
            ws = split[0][0].ws[0]
            return (ws.readonly(T, B, "y" if padded else "h_out", self.batch_first),
                    (ws.readonly(T, B, "h_n"), ws.readonly(T, B, "c_n")))
        return readonly(self._time_major(out)), (readonly(h_n), readonly(c_n))

    def _enter_plan(self, x):
        """For a caller that runs the kernels itself (SequenceModel's fused step): the
        plan for x's shape, with x copied in and the call recorded as the last
        forward, or None when there is none. x must be a validated float array."""
        plan = self._plans.get(x.shape)
        if type(plan) is not _Plan:         # none, or a split one: the fused step has neither
            return None
        np.copyto(plan.x, x, casting="same_kind")
        plan.thread = threading.get_ident()
        self._last = plan
        return plan

    def backward(self, dy, dstate=None):
        """Backpropagate through the last ``forward``; add into ``grads``.

        Parameters
        ----------
        dy : ndarray, the shape of ``forward``'s y
            Gradient of the loss with respect to y; its padded steps are ignored.
        dstate : (dh_n, dc_n), optional
            Gradients with respect to the final states, shaped as h_n and c_n;
            zeros when omitted.

        Returns
        -------
        dx : ndarray, the shape of x
        (dh0, dc0) : ndarrays, the shapes of h0 and c0
            Read-only views into the workspace, valid until the next call.
        """
        with self._guard("backward"):
            return self._backward(dy, dstate)

    def _backward(self, dy, dstate):
        if self._last is None:
            raise RuntimeError("backward() needs a forward() first: there are no "
                               "activations to differentiate")
        if self._last.thread != threading.get_ident():
            raise RuntimeError("backward() would differentiate the last forward(), which "
                               "another thread made on this LSTM; use one model per thread")
        last = self._last
        T, B, lens, masks = last.T, last.B, last.lengths, last.masks
        L, D, H, P = self.num_layers, self.num_directions, self.hidden_size, self._P
        check.float_array("dy", dy, self.dtype)
        plan = last
        if type(plan) is _Plan and dstate is None and dy.shape == plan.dy.shape:
            np.copyto(plan.dy, dy, casting="same_kind")
            layer_backward(*plan.bargs)
            return plan.grad_out
        if (type(plan) is _SplitPlan and dstate is None and dy.shape == plan.dy_shape
                and dy.dtype == self.dtype):
            return plan.backward(dy)
        check.shape("dy", dy, (B, T, D * P) if self.batch_first else (T, B, D * P))
        dh_n, dc_n = self._state("dstate", dstate, B)
        grad = self._time_major(dy)
        if len(last.split) == 1:
            dx, dh0, dc0 = self._part(0).backward(grad, dh_n, dc_n, lens, masks, pairs=True,
                                                  one_thread=last.one_thread)
        else:
            def run(r, cut):
                part = self._part(r)
                if r:
                    part.flat_grads.fill(0)
                return part.backward(grad[:, cut], _rows(dh_n, cut), _rows(dc_n, cut),
                                     lens[cut], [None if m is None else m[:, cut] for m in masks])
            results = run_parts([partial(run, r, slice(b0, b1))
                                 for r, (_, b0, b1) in enumerate(last.split)])
            for r in range(1, len(last.split)):      # in order: the same sum every time
                self.flat_grads += self._parts[r].flat_grads
            dx = self._buf.get("dx", (T, B, self.input_size))
            dh0 = self._buf.get("dh0", (L * D, B, P))
            dc0 = self._buf.get("dc0", (L * D, B, H))
            for (_, b0, b1), (d, h, c) in zip(last.split, results):
                dx[:, b0:b1], dh0[:, b0:b1], dc0[:, b0:b1] = d, h, c
        if len(last.split) == 1 and L * D == 1:
            ws = self._part(0).ws[0]
            return (ws.readonly(T, B, "dx", self.batch_first),
                    (ws.readonly(T, B, "dh0"), ws.readonly(T, B, "dc0")))
        return readonly(self._time_major(dx)), (readonly(dh0), readonly(dc0))

    def zero_grad(self):
        """Set every gradient to zero."""
        self.flat_grads.fill(0)

    # -- parameters --------------------------------------------------------

    def state_dict(self):
        """Copies of the parameters, under torch's names and shapes."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict):
        """Load parameters saved by ``state_dict`` or converted from torch.

        Every key, type and shape is checked before anything is written; floating
        arrays of another dtype are cast to the model's.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = set(self.params)
        missing = sorted(expected - set(state_dict.keys()))
        unexpected = sorted(set(state_dict.keys()) - expected)
        if missing:
            raise KeyError(f"state_dict is missing {missing} (expected keys {sorted(expected)})"
                           + _options_of(missing, "this model has"))
        if unexpected:
            raise KeyError(f"state_dict has unexpected keys {unexpected} "
                           f"(expected keys {sorted(expected)})"
                           + _options_of(unexpected, "they belong to a model with"))
        for name, shape in self._layout:
            a = state_dict[name]
            check.float_array(f"state_dict[{name!r}]", a, self.dtype)
            check.shape(f"state_dict[{name!r}]", a, shape)
        for name, _ in self._layout:
            np.copyto(self.params[name], state_dict[name], casting="same_kind")
