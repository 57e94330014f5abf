"""Serving: ``Inference`` (a model's weights copied for evaluation) and its live streams.

A stream runs one step of every layer per call, each layer as ``layer_forward`` over
T = 1 in a one-step workspace of its own (``_kernels.stream_step``): the same kernels as
a whole-sequence forward, in the same order, so a stream over T steps gives what a
forward over them gives. The weights are packed into the workspaces on a stream's
first step and read from there after.
"""
import numpy as np

from . import _layout
from . import _validate as check
from ._columns import to_bfloat16
from ._compile import ensure
from ._kernels import ONE_THREAD, PACKED, STREAM_META, stream_step
from ._numba_ext import entry_point
from ._plans import ColumnPlan
from ._shared import aligned_zeros, readonly
from ._threads import column_parts
from .lstm import LSTM

__all__ = ["Inference", "Stream"]

WEIGHTS = ("float32", "bfloat16")


class Inference:
    """A model's current weights, copied for evaluation: whole sequences and live streams.

    Parameters
    ----------
    model : LSTM or SequenceModel
    weights : "float32" or "bfloat16"
        How the weight matrices are kept. "bfloat16": as bfloat16 bit patterns (rounded
        to nearest even), widened to float32 as the kernels read them and accumulated in
        float32 — half the weight traffic, for small batches where that traffic is the
        time (see docs/deploying.md). It takes a float32, one-direction model without
        projection, peepholes, layer norm or zoneout, and always runs the column split
        (fastlstm._columns).

    Notes
    -----
    Evaluation semantics (no dropout; zoneout's expectation): a forward keeps nothing it
    does not return (see ``LSTM.forward``'s keep). ``refresh()`` copies the model's
    weights again after more training.
    """

    def __init__(self, model, weights="float32"):
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        lstm = getattr(model, "lstm", model)
        if not isinstance(lstm, LSTM):
            raise TypeError(f"model must be a fastlstm.LSTM or a SequenceModel on the "
                            f"fastlstm backend, got {type(model).__name__}")
        if weights == "bfloat16" and (lstm.dtype != np.float32 or not lstm._columns_ok):
            raise ValueError(
                "weights='bfloat16' takes a float32 model of one direction without "
                "proj_size, peephole, layer_norm or zoneout (its kernel is the column split "
                f"of such a layer), got dtype={lstm.dtype}, bidirectional={lstm.bidirectional}"
                f", proj_size={lstm.proj_size}, peephole={lstm.peephole}, layer_norm="
                f"{lstm.layer_norm}, zoneout={lstm.zoneout}, zoneout_cell={lstm.zoneout_cell}")
        self.model, self.weights = model, weights
        self._seq = model if lstm is not model else None
        self._lstm = LSTM(**lstm.config(), threads=lstm.threads).eval()
        if self._seq is not None:
            from .model import SequenceModel
            config = {k: v for k, v in self._seq.config.items() if k != "backend"}
            self._seq_copy = SequenceModel(**config, threads=lstm.threads)
            self._seq_copy.lstm.eval()
            self._lstm = self._seq_copy.lstm
        if weights == "bfloat16":
            self._lstm._col_weights = np.zeros(self._lstm.flat_params.shape, np.uint16)
        self.refresh()

    def refresh(self):
        """Copy the model's current weights again (its guard held: not in the middle of
        a call on another thread)."""
        src = self._seq if self._seq is not None else self.model
        with src._guard("Inference"):
            if self._seq is not None:
                np.copyto(self._seq_copy.flat_params, self._seq.flat_params)
            else:
                np.copyto(self._lstm.flat_params, self.model.flat_params)
        if self.weights == "bfloat16":          # in place: the column plans hold this array
            np.copyto(self._lstm._col_weights, to_bfloat16(self._lstm.flat_params))
        self._generation = getattr(self, "_generation", 0) + 1   # streams pack them again
        self._lstm._weights_version = self._generation           # and the column plans
        return self

    @property
    def output_size(self):
        return self._seq_copy.output_size if self._seq is not None else self._lstm.output_size

    def forward(self, x, lengths=None, state=None):
        """Whole sequences: an LSTM's ``forward(x, state, lengths)`` in evaluation mode,
        keeping nothing; a SequenceModel's ``predict`` output."""
        if self._seq is not None:
            return self._seq_copy.predict(x, lengths=lengths, state=state)
        return self._lstm.forward(x, state=state, lengths=lengths, keep=False)

    def stream(self, batch_size=1):
        """A live stream of `batch_size` sequences, one step at a time (``Stream``)."""
        return Stream(self, check.positive_int("batch_size", batch_size))


class Stream:
    """Live input, one step at a time, the state carried between steps.

    ``step(x_t)`` takes (B, input_size) and returns (B, output): the last layer's h, or
    for a SequenceModel its head's prediction at this step (``predict``'s transform), a
    read-only view valid until the next step. ``state`` reads (copies) and sets (h, c);
    ``reset(rows=None)`` zeroes the state of some rows (or all). A step allocates no
    array and runs without the GIL.
    """

    def __init__(self, inference, batch_size):
        lstm = inference._lstm
        if lstm.bidirectional:
            raise ValueError("stream() needs a one-direction model: a bidirectional layer "
                             "reads each sequence from its end, which a live stream has not "
                             "seen yet")
        self._inf, self.batch_size = inference, batch_size
        B, L, H, P = batch_size, lstm.num_layers, lstm.hidden_size, lstm._P
        dt = lstm.dtype
        self._head = inference._seq_copy if inference._seq is not None else None
        if self._head is not None:
            self._logits = np.zeros((B, self._head.output_size), dt)
            self._row = np.zeros((B, 1), dt)
            self._out_ro = readonly(self._logits)
        bf16 = lstm._col_weights is not None
        n = column_parts(lstm.threads, B, H) if lstm._columns_ok else 1
        self._plan = None
        if n > 1 or bf16:    # the units split over the cores (see _columns): x, y, state there
            self._plan = ColumnPlan(lstm._spec, lstm.flat_params, 1, B, n, lstm._col_weights,
                                    carry=(aligned_zeros((L, B, H), dt),
                                           aligned_zeros((L, B, H), dt)))
            self._alone = None          # the plan on this thread alone, made when needed
            self._h, self._c = self._plan.h0, self._plan.c0
            self._x, self._y = self._plan.x[0], self._plan.y[0]
            self._x_shape, self._y_ro = self._x.shape, readonly(self._y)
            return
        ensure(lstm.dtype, stream_step)
        offsets = [o for o, _, _ in lstm._blocks]
        p_off = offsets + [offsets[-1] + lstm._blocks[-1][1]]
        w_off = np.concatenate([[0], np.cumsum(
            [_layout.workspace_size(1, B, I_k, H, P, *lstm._wflags)
             for _, _, I_k in lstm._blocks])]).astype(int)
        end = int(w_off[-1])                        # then y, h, c
        at = dict(y=end, h=end + B * P, c=end + B * P + L * B * P)
        self._ws = aligned_zeros(at["c"] + L * B * H, dt)
        self._y = self._ws[at["y"]:at["h"]].reshape(B, P)
        self._h = self._ws[at["h"]:at["c"]].reshape(L, B, P)
        self._c = self._ws[at["c"]:].reshape(L, B, H)
        sizes = dict(L=L, B=B, I=lstm.input_size, H=H, P=P, opts=lstm._opts | ONE_THREAD, **at)
        self._meta = np.array([sizes[k] for k in STREAM_META] + list(p_off) + list(w_off)
                              + [1] * B, np.int64)
        self._opts_at = STREAM_META.index("opts")
        for k, (_, _, I_k) in enumerate(lstm._blocks):   # evaluation: zoneout's expectation
            v = _layout.carve(self._ws[w_off[k]:w_off[k + 1]],
                              _layout.workspace_table(1, B, I_k, H, P, *lstm._wflags))
            if "zh" in v:
                v["zh"].fill(lstm.zoneout)
                v["zc"].fill(lstm.zoneout_cell)
            if "rmask" in v:
                v["rmask"].fill(1)
        self._x = np.zeros((B, lstm.input_size), dt)
        self._x_shape = self._x.shape
        self._y_ro = readonly(self._y)
        self._generation = -1       # the weights get packed on the first step
        # the private copy's buffers never change (refresh copies into them): a step's
        # Python, about 0.2 us of a 2 us step at H = 64, reads one attribute for them
        self._p_clip = (lstm.flat_params, lstm._clip)
        # the compiled step without the dispatcher, whose checks of five arguments took
        # 0.22 us of a 2.1 us step (I = 32, H = 64): step() checks x_t, the one argument
        # the stream does not own
        self._call = entry_point(stream_step, lstm.flat_params, self._ws, self._x,
                                 self._meta, lstm._clip) or stream_step

    @property
    def state(self):
        """(h, c): copies of the state, (num_layers, B, P) and (num_layers, B, H)."""
        return self._h.copy(), self._c.copy()

    @state.setter
    def state(self, value):
        h, c = check.pair("state", value)
        for name, a, dst in (("state[0] (h)", h, self._h), ("state[1] (c)", c, self._c)):
            check.float_array(name, a, dst.dtype)
            check.shape(name, a, dst.shape)
        np.copyto(self._h, h, casting="same_kind")
        np.copyto(self._c, c, casting="same_kind")

    def reset(self, rows=None):
        """Zero the state of `rows` (indices into the batch; all when None)."""
        if rows is None:
            self._h.fill(0)
            self._c.fill(0)
            return
        idx = np.asarray(rows)
        if idx.dtype.kind not in "iu" or idx.ndim > 1:
            raise TypeError(f"rows must be integer indices into the batch, got {rows!r}")
        if idx.size and (idx.min() < -self.batch_size or idx.max() >= self.batch_size):
            raise ValueError(f"rows must lie in [0, {self.batch_size}), got {rows!r}")
        self._h[:, idx] = 0
        self._c[:, idx] = 0

    def step(self, x_t):
        """One step: x_t (B, input_size) -> (B, output); see the class."""
        if self._plan is not None:
            return self._columns_step(x_t)
        generation = self._inf._generation
        if self._generation != generation:       # new weights: pack them first
            return self._first_step(x_t, generation)
        # the compiled step is called directly (see __init__): x_t must be exactly what
        # it was compiled for, else it is copied into the stream's own buffer
        if (type(x_t) is not np.ndarray or x_t.shape != self._x_shape
                or x_t.dtype is not self._x.dtype or not x_t.flags.carray):
            x_t = self._checked(x_t)
        p, clip = self._p_clip
        self._call(p, self._ws, x_t, self._meta, clip)
        if self._head is None:
            return self._y_ro
        return self._predict()

    def _first_step(self, x_t, generation):
        """A step after new weights (or the first): packs them into the workspaces."""
        x_t, (p, clip) = self._checked(x_t), self._p_clip
        self._meta[self._opts_at] &= ~PACKED
        stream_step(p, self._ws, x_t, self._meta, clip)
        self._meta[self._opts_at] |= PACKED
        self._generation = generation
        return self._y_ro if self._head is None else self._predict()

    def _columns_step(self, x_t):
        plan = self._plan
        if type(x_t) is np.ndarray and x_t.shape == self._x_shape and x_t.dtype == self._x.dtype:
            np.copyto(self._x, x_t)
        else:
            self._checked(x_t)
        if not plan.run():          # the servers are another thread's: this thread alone
            if self._alone is None:
                lstm = self._inf._lstm
                self._alone = ColumnPlan(lstm._spec, lstm.flat_params, 1, self.batch_size, 1,
                                         lstm._col_weights, carry=(self._h, self._c))
            np.copyto(self._alone.x, plan.x)
            self._alone.run()
            np.copyto(self._y, self._alone.y[0])
        if self._head is None:
            return self._y_ro
        return self._predict()

    def _checked(self, x_t):
        """x_t validated and copied into the stream's own (B, I) buffer of its dtype."""
        check.float_array("x_t", x_t, self._x.dtype)
        if x_t.shape != self._x_shape:
            raise ValueError(f"x_t must have shape (batch_size={self.batch_size}, "
                             f"input_size={self._x_shape[1]}), got {x_t.shape}")
        np.copyto(self._x, x_t, casting="same_kind")
        return self._x

    def _predict(self):
        m = self._head
        z = self._logits
        np.dot(self._y, m.W.T, out=z)
        z += m.b
        if m.loss == "bce":
            np.multiply(z, 0.5, out=z)
            np.tanh(z, out=z)
            z += 1
            z *= 0.5
        elif m.loss == "ce":
            np.max(z, axis=1, keepdims=True, out=self._row)
            z -= self._row
            np.exp(z, out=z)
            np.sum(z, axis=1, keepdims=True, out=self._row)
            z /= self._row
        return self._out_ro
