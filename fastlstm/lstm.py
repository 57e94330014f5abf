"""The public LSTM: validates, owns the buffers, splits the batch, calls the parts.

The rooms behind it: ``_options`` (what each option is), ``_layout`` (the flat
buffers), ``_masks`` (a call's random masks), ``_parts`` (the workspaces, the general
path and the batch split's parts), ``_plans`` (repeated calls made once), ``_units``
(calls split by hidden units), ``_threads`` (the batch split's rules and threads),
``_kernels`` (the Numba entries), ``_persist`` (what a model saves and loads).
"""
import math
import threading

import numpy as np

from . import _layout, _options
from . import _validate as check
from ._config import exact_activations
from ._kernels import layer_backward, layer_forward, opts_bits
from ._masks import dropout_masks, variant_masks
from ._parts import Part, Spec, split_backward, split_forward
from ._persist import Persist
from ._plans import ColumnTrainPlan, Last, Plan, Plans, SplitPlan
from ._shared import Buffers, OneThread, aligned_zeros, readonly
from ._threads import SPLIT_WORK, batch_parts, single_threaded
from ._units import UnitsSplit

__all__ = ["LSTM"]


class LSTM(UnitsSplit, Persist):
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
    recompute : None, int or "sqrt"
        None keeps every step's activations for the backward (the fastest). K keeps
        the state every K steps (rounded up to a whole number of the backward's
        chunks of steps; ``last_segment_steps`` says what a call used) and
        recomputes each segment's forward inside the backward, last segment first:
        memory O(T/K + K) steps instead of O(T), for about one more forward;
        "sqrt" picks K = ceil(sqrt(T)) per call. The gradients are bitwise those
        of None on the batch split (None's training split by hidden units, see
        _columns_train, agrees to rounding). K >= T is one segment: None's path.
    threads : int or None
        Threads a call may use: the batch is split into that many parts, each run
        on its own thread with single-threaded BLAS, when the work pays for it.
        None: the cores this process may use, capped by a threadpoolctl limit on
        BLAS in force at the call. Results are bitwise repeatable for a fixed
        count; another count changes the last bits (the order of sums).

    Notes
    -----
    A forward in evaluation mode keeps nothing it does not return (``forward``'s
    ``keep``): over more steps than fit ``EVAL_SEGMENT_BYTES`` it runs in segments,
    and its memory beyond x and y does not grow with T.

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
                 layer_norm=False, zoneout=0.0, zoneout_cell=0.0, recurrent_dropout=0.0,
                 recompute=None):
        config = _options.layer_config(
            input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
            dropout=dropout, bidirectional=bidirectional, proj_size=proj_size, dtype=dtype,
            seed=seed, forget_bias=forget_bias, cell_clip=cell_clip, threads=threads,
            peephole=peephole, layer_norm=layer_norm, zoneout=zoneout, zoneout_cell=zoneout_cell,
            recurrent_dropout=recurrent_dropout, recompute=recompute)
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
        flags = _options.param_flags(config)
        self._wflags = _options.workspace_flags(config)
        total = D * (_layout.param_size(self.input_size, H, P, *flags)
                     + (self.num_layers - 1) * _layout.param_size(D * P, H, P, *flags))
        check.affordable(2 * total, self.dtype, what)     # before any list of that size is built
        # per (layer, direction): (offset, size, input size); (name, shape) of every parameter
        self._blocks, self._layout = _layout.layer_blocks(self.input_size, H, P,
                                                          self.num_layers, D, *flags)
        offset = sum(size for _, size, _ in self._blocks)
        self._clip = self.dtype.type(np.inf if self.cell_clip is None else self.cell_clip)
        self._exact = exact_activations()
        # the kernels' options, as the bits of one integer (see _kernels.opts_bits)
        self._opts = opts_bits(**_options.flags(config), exact=self._exact)
        self._parts = []       # per part of the batch: workspaces and scratch (_parts.Part)
        self._splits = {}
        self._plans = Plans()      # x.shape -> Plan, SplitPlan or ColumnTrainPlan
        self._col_plans = Plans()  # (T, B) -> ColumnPlan (an evaluation forward split by units)
        #: the layer an evaluation forward may split by hidden units (see _columns)
        self._columns_ok = (D == 1 and not self.proj_size and not (
            self.peephole or self.layer_norm or self.zoneout or self.zoneout_cell))
        self._col_weights = None   # bfloat16 copy of flat_params (fastlstm.Inference's)
        #: None, or a number that changes whenever flat_params do: fastlstm.Inference's copy
        #: (no one else writes its weights) sets it, and the column plans pack them once
        self._weights_version = None
        self._fast_paths = True  # False (before the first call): no plans are made
        self.bind(check.allocate(offset, self.dtype, what), aligned_zeros(offset, self.dtype))
        bound = 1.0 / math.sqrt(H)
        self.flat_params[:] = np.random.default_rng(self.seed).uniform(-bound, bound, offset)
        for name, a in self.params.items():
            if name.startswith("bias_ih") and self.forget_bias:
                a[H:2 * H] += self.forget_bias
            elif name.startswith("ln_"):           # layer norm: gain 1, bias 0
                a[:] = 1.0 if "_weight_" in name else 0.0
        self._rng = np.random.default_rng(None if self.seed is None else [self.seed, 1])
        self._buf = Buffers(self.dtype)
        self._full_lengths = {}
        self._affordable = set()
        self._step_bytes = {}      # B -> workspace bytes (of T = 0, of each step)
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
        self._spec = Spec(
            pblocks=tuple(flat_params[o:o + k] for o, k, _ in self._blocks),
            gblocks=tuple(flat_grads[o:o + k] for o, k, _ in self._blocks),
            flat_grads=flat_grads, offsets=tuple(o for o, _, _ in self._blocks),
            in_sizes=tuple(i for _, _, i in self._blocks), H=self.hidden_size, P=self._P,
            L=self.num_layers, D=self.num_directions, clip=self._clip, opts=self._opts,
            wflags=self._wflags, dtype=self.dtype, batch_first=self.batch_first,
            threads=self.threads)
        self._plans.clear()          # they hold the old blocks
        self._col_plans.clear()
        for part in self._parts:
            part.spec = self._spec

    @property
    def last_lengths(self):
        """The int64 lengths (B,) of the last forward (T for every sequence when
        none were given); None before the first forward."""
        return None if self._last is None else self._last.lengths

    def workspace_bytes(self, T, B):
        """Bytes of the workspaces a (T, B) forward and its backward keep, over every
        layer and direction (one part of the batch: a split adds one per part)."""
        ab = self._step_bytes.get(B)
        if ab is None:      # affine in T; the layout tables cost about 0.5 ms a size
            size = [self.dtype.itemsize * sum(
                _layout.workspace_size(t, B, I_k, self.hidden_size, self._P, *self._wflags)
                for _, _, I_k in self._blocks) for t in (0, 1)]
            ab = self._step_bytes[B] = (size[0], size[1] - size[0])
        return ab[0] + T * ab[1]

    @property
    def output_size(self):
        """Features of each step of y: D * (proj_size or hidden_size)."""
        return self.num_directions * self._P

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

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
            self._parts.append(Part(self._spec, len(self._parts) > 0, self._plans))
        return self._parts[r]

    # -- forward / backward ------------------------------------------------

    def _split(self, T, B):
        """[(part, first, end)] over the batch: one part per thread when the work
        pays for the hand-off, else the whole batch as part 0 (see _threads)."""
        n = batch_parts(self.threads, B, T * B * 4 * self.hidden_size
                        * (self.input_size + self._P) * self.num_layers)
        key = (n, B)
        split = self._splits.get(key)          # cached: small calls cannot spare building it
        if split is None:
            split = self._splits[key] = [(self._part(r), r * B // n, (r + 1) * B // n)
                                         for r in range(n)]
        return split

    #: bytes of workspace one segment of a forward that keeps nothing (evaluation) may
    #: take; a longer x runs in segments of this size
    EVAL_SEGMENT_BYTES = 16 << 20

    def _segmenting(self, T, B, keep):
        """None (one call over all T steps, keeping them), or the forward's segments:
        (steps per segment before the parts round them, whether their states are kept
        for a recomputing backward)."""
        if keep:
            if self.recompute is None:
                return None
            K = math.isqrt(T - 1) + 1 if self.recompute == "sqrt" else self.recompute
        else:
            step = self.workspace_bytes(2, B) - self.workspace_bytes(1, B)
            K = max(1, self.EVAL_SEGMENT_BYTES // step)
        return None if T <= K else (K, keep)

    @property
    def last_segment_steps(self):
        """Steps per segment of the last forward (its first part's first layer), or None
        when it ran over all steps at once."""
        if self._last is None or self._last.seg is None:
            return None
        return self._parts[0].segs[0].K

    def forward(self, x, state=None, lengths=None, keep=None, return_sequences=True):
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
        keep : bool, optional
            Keep what ``backward`` needs (with ``recompute``, the segments' states).
            None: in training mode only. A forward that keeps nothing cannot be
            differentiated; over many steps it runs in segments (``EVAL_SEGMENT_BYTES``),
            and stores no per-step activations beyond y.
        return_sequences : bool
            False: return, in y's place, each sequence's output at its own last step
            (B, D*H_out), as Keras' ``return_sequences=False``; ``backward`` then takes dy
            of that shape. In segments (``recompute``, evaluation) the last layer's
            T steps of output are then never stored: a many-to-one model's memory.

        Returns
        -------
        y : ndarray (T, B, D*H_out), or (B, T, D*H_out) with batch_first
        (h_n, c_n) : ndarrays (D*num_layers, B, H_out), (D*num_layers, B, hidden_size)
            Read-only views into the workspace, valid until the next call.
        """
        with self._guard("forward"):
            # the defaults without a check: a seed-size call takes about 8 us in all
            keep = self.training if keep is None else check.boolean("keep", keep)
            if return_sequences is True or check.boolean("return_sequences", return_sequences):
                return self._forward(x, state, lengths, keep)
            return self._forward(x, state, lengths, keep, last_only=True)

    def _forward(self, x, state, lengths, keep, last_only=False):
        check.float_array("x", x, self.dtype)
        if state is None and lengths is None and not last_only and (keep or not self._units_split):
            # a shape this model has run before (a plan is made where no segments are)
            plan = self._plans.get(x.shape)
            if type(plan) is Plan:
                np.copyto(plan.x, x, casting="same_kind")
                layer_forward(*plan.fargs)
                plan.thread = threading.get_ident()
                plan.kept = keep
                self._last = plan
                return plan.out
            if (type(plan) is SplitPlan and x.dtype == self.dtype
                    and self._split(plan.T, plan.B) is plan.split):
                out = plan.forward(x)
                plan.thread = threading.get_ident()
                plan.kept = keep
                self._last = plan
                return out
            if (type(plan) is ColumnTrainPlan and plan.n == self._train_columns(plan.T, plan.B)
                    and not (self.training and self.dropout > 0 and self.num_layers > 1)):
                out = plan.forward(self._time_major(x))
                if out is not None:
                    plan.thread = threading.get_ident()
                    plan.kept = keep
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
        seg = self._segmenting(T, B, keep)
        if (T, B, seg is None) not in self._affordable:    # once per shape: the arithmetic
            # in segments, what grows with T: x's copy, dx, each layer's y and its gradient
            check.affordable(self.workspace_bytes(T, B) // self.dtype.itemsize if seg is None
                             else T * B * 2 * (self.input_size
                                               + self.num_layers * self.output_size),
                             self.dtype, f"the workspace for T={T}, B={B} (x's shape)")
            self._affordable.add((T, B, seg is None))
        padded = lens is not None
        if not keep and self._columns_ok and (seg is None or self.dtype.itemsize * T * B * (
                4 + 2 * (self.num_layers > 1)) * self.hidden_size <= self.EVAL_SEGMENT_BYTES):
            # the column split keeps its gates (4H a step) and the layers' outputs below the
            # last: within the bound of an evaluation forward's segments
            out = self._columns_forward(xt, h0, c0, lens, last_only)
            if out is not None:
                return out
        if lens is None:
            lens = self._full_lengths.get((T, B))
            if lens is None:
                lens = self._full_lengths[(T, B)] = np.full(B, T, np.int64)
        L, D, H, P = self.num_layers, self.num_directions, self.hidden_size, self._P
        masks = dropout_masks(self._buf, self._rng, self.dropout if self.training else 0, L,
                              T, B, D * P)
        vmasks = variant_masks(self._buf, self._rng, self._wflags, self.training, self.zoneout,
                               self.zoneout_cell, self.recurrent_dropout, L * D, T, B, H, P)
        if (keep and not padded and not last_only and seg is None and not vmasks
                and self._train_columns(T, B) > 1 and self._fast_paths):
            out = self._columns_train_forward(x, xt, h0, c0, masks)
            if out is not None:
                return out
        split = self._split(T, B)
        one_thread = single_threaded(len(split), T * B * 4 * H * (self.input_size + P) * L)
        in_parts = last_only and seg is not None      # else gathered from y here
        if len(split) == 1:
            out, h_n, c_n = split[0][0].forward(xt, h0, c0, lens, padded, masks, vmasks,
                                                pairs=True, one_thread=one_thread, seg=seg,
                                                last_only=in_parts)
        else:
            out = self._buf.get("y_last" if in_parts else "y",
                                (B, D * P) if in_parts else (T, B, D * P))
            h_n = self._buf.get("h_n", (L * D, B, P))
            c_n = self._buf.get("c_n", (L * D, B, H))
            split_forward(split, xt, h0, c0, lens, padded, masks, vmasks, seg, in_parts,
                          out, h_n, c_n)
        self._last = Last(T, B, lens, masks, vmasks, split, one_thread=one_thread, seg=seg,
                          kept=keep, last_only=last_only)
        if last_only:
            if not in_parts:        # each sequence's own last step, from all of y
                y_last = self._buf.get("y_last", (B, D * P))
                np.copyto(y_last, out[lens - 1, np.arange(B)])
                out = y_last
            return readonly(out), (readonly(h_n), readonly(c_n))
        if seg is not None:
            return readonly(self._time_major(out)), (readonly(h_n), readonly(c_n))
        if state is None and not padded and L * D == 1 and not vmasks and self._fast_paths:
            if len(split) == 1 and (B < 2 or T * B * 4 * H * (self.input_size + P) < SPLIT_WORK):
                # the next call at this shape takes the plan (never split, whatever the threads)
                self._plans.put(x.shape, Plan(self._spec, T, B, split, lens))
            elif len(split) > 1:
                self._plans.put(x.shape, SplitPlan(self._spec, T, B, split, lens))
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
        if type(plan) is not Plan:          # none, or a split one: the fused step has neither
            return None
        np.copyto(plan.x, x, casting="same_kind")
        plan.thread = threading.get_ident()
        self._last = plan
        return plan

    def backward(self, dy, dstate=None, input_grad=True):
        """Backpropagate through the last ``forward``; add into ``grads``.

        Parameters
        ----------
        dy : ndarray, the shape of ``forward``'s y
            Gradient of the loss with respect to y; its padded steps are ignored.
        dstate : (dh_n, dc_n), optional
            Gradients with respect to the final states, shaped as h_n and c_n;
            zeros when omitted.
        input_grad : bool
            False when no one wants x's gradient (x is data): dx is returned as None,
            and the first layer skips its product (dx W_ih), except in segments
            (``recompute``) and in the split by hidden units.

        Returns
        -------
        dx : ndarray, the shape of x, or None
        (dh0, dc0) : ndarrays, the shapes of h0 and c0
            Read-only views into the workspace, valid until the next call.
        """
        with self._guard("backward"):
            if input_grad is not True:
                input_grad = check.boolean("input_grad", input_grad)
            out = self._backward(dy, dstate, input_grad)
            return out if input_grad else (None, out[1])

    def _backward(self, dy, dstate, input_grad=True):
        if self._last is None:
            raise RuntimeError("backward() needs a forward() first: there are no "
                               "activations to differentiate")
        if self._last.thread != threading.get_ident():
            raise RuntimeError("backward() would differentiate the last forward(), which "
                               "another thread made on this LSTM; use one model per thread")
        last = self._last
        if not last.kept:
            raise RuntimeError("backward() needs a forward() that kept its activations: the "
                               "last one ran in evaluation mode (or with keep=False), which "
                               "keeps nothing; run it in training mode or with keep=True")
        T, B = last.T, last.B
        L, D, P = self.num_layers, self.num_directions, self._P
        check.float_array("dy", dy, self.dtype)
        if last.last_only:
            return self._backward_last(dy, dstate, input_grad)
        plan = last
        if type(plan) is Plan and dstate is None and dy.shape == plan.dy.shape:
            if not plan.backward_ready:
                plan.ready_backward()
            np.copyto(plan.dy, dy, casting="same_kind")
            layer_backward(*(plan.bargs if input_grad else plan.bargs_no_dx))
            return plan.grad_out
        if (type(plan) is SplitPlan and dstate is None and dy.shape == plan.dy_shape
                and dy.dtype == self.dtype):
            return plan.backward(dy, input_grad)
        if type(plan) is ColumnTrainPlan:
            check.shape("dy", dy, plan.dy_shape)
            dh_n, dc_n = self._state("dstate", dstate, B)
            out = plan.backward(self._time_major(dy), dh_n, dc_n)
            if out is None:
                raise RuntimeError("backward() found the threads busy with another thread's "
                                   "call; use one model per thread")
            return out
        check.shape("dy", dy, (B, T, D * P) if self.batch_first else (T, B, D * P))
        dh_n, dc_n = self._state("dstate", dstate, B)
        grad = self._time_major(dy)
        seg = last.seg is not None
        dx, dh0, dc0 = self._parts_backward(grad, dh_n, dc_n, seg, want_dx=input_grad)
        if len(last.split) == 1 and L * D == 1 and not seg:
            ws = self._part(0).ws[0]
            return (ws.readonly(T, B, "dx", self.batch_first),
                    (ws.readonly(T, B, "dh0"), ws.readonly(T, B, "dc0")))
        return readonly(self._time_major(dx)), (readonly(dh0), readonly(dc0))

    def _backward_last(self, dy, dstate, input_grad):
        """backward after forward(..., return_sequences=False): dy (B, D*P) is the gradient
        on each sequence's last output; in segments the parts take it as it is, else it
        is scattered into a (T, B, D*P) dy at each sequence's own last step."""
        last = self._last
        T, B, lens = last.T, last.B, last.lengths
        D, P = self.num_directions, self._P
        check.shape("dy", dy, (B, D * P))
        dh_n, dc_n = self._state("dstate", dstate, B)
        seg = last.seg is not None
        if not seg:
            grad = self._buf.get("dy_full", (T, B, D * P))
            grad.fill(0)
            grad[lens - 1, np.arange(B)] = dy
        else:
            grad = dy
        dx, dh0, dc0 = self._parts_backward(grad, dh_n, dc_n, seg, last_only=seg,
                                            want_dx=input_grad)
        return readonly(self._time_major(dx)), (readonly(dh0), readonly(dc0))

    def _parts_backward(self, grad, dh_n, dc_n, seg, last_only=False, want_dx=True):
        """The backward of every part of the last forward's batch (grad time-major, or
        (B, D*P) with last_only); their weight gradients summed into ``flat_grads`` in
        order: (dx, dh0, dc0), dx time-major. In segments each part writes its rows of
        dx itself (no second copy of x's size)."""
        last = self._last
        T, B, lens, masks = last.T, last.B, last.lengths, last.masks
        L, D, H, P = self.num_layers, self.num_directions, self.hidden_size, self._P
        if len(last.split) == 1:
            return self._part(0).backward(grad, dh_n, dc_n, lens, masks, pairs=True,
                                          one_thread=last.one_thread, seg=seg,
                                          last_only=last_only, want_dx=want_dx)
        dx = self._buf.get("dx", (T, B, self.input_size))
        dh0 = self._buf.get("dh0", (L * D, B, P))
        dc0 = self._buf.get("dc0", (L * D, B, H))
        split_backward(last.split, self.flat_grads, grad, dh_n, dc_n, lens, masks, seg,
                       last_only, dx, dh0, dc0, want_dx)
        return dx, dh0, dc0

    def zero_grad(self):
        """Set every gradient to zero."""
        self.flat_grads.fill(0)
