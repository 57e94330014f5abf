"""SequenceModel: an LSTM, a linear head and a loss, with a one-call training step,
``fit``, and checkpoints."""
import math

import numpy as np

from . import _layout, _losses, _options, _step, checkpoint, training
from . import _validate as check
from ._compile import ensure
from ._kernels import layer_backward, layer_forward
from ._layout import carve
from ._shared import Buffers, OneThread, aligned_empty, aligned_zeros
from ._step import CLIP, MAX_NORM, RULE
from .lstm import LSTM
from .optim import clip_grad_norm
from .reference import ReferenceLSTM

__all__ = ["SequenceModel", "load", "BACKENDS"]

HEADS = ("last", "all")
LOSSES = tuple(_step.LOSSES)
#: the layer classes a SequenceModel can be built around, by backend name
BACKENDS = {"fastlstm": LSTM, "reference": ReferenceLSTM}


class _StepPlan:
    """The fused step's arrays for one x shape (see _step). It refers to no plan of the
    LSTM's: a plan the layer makes anew at this shape (its workspace grown, say) has the
    same sizes, and the step passes the current plan's workspace and lengths."""

    def __init__(self, model, plan):
        ensure(model.dtype, layer_forward, layer_backward)     # the step calls both
        clip, T, B, I, H, P, opts = plan.sizes[1:]
        O = model.output_size
        fields = dict(T=T, B=B, I=I, H=H, P=P, opts=opts, n=model.lstm.flat_params.size, O=O,
                      loss=_step.LOSSES[model.loss], rule=0)
        self.ints = np.array([fields[k] for k in _step.INTS], np.int64)
        self.hyper = np.zeros(_step.N_SCALARS)
        self.hyper[CLIP] = clip
        self.valid = np.ones(B, np.uint8)
        self.scratch = np.empty(2 * B * (P + O), model.dtype)
        self.target = np.empty(B, np.int64) if model.loss == "ce" else np.empty((B, O),
                                                                                model.dtype)


class SequenceModel:
    """An LSTM (batch-first data), a linear head and a loss.

    Parameters
    ----------
    input_size, hidden_size : int
    output_size : int
        Outputs of the head; for ``loss="ce"``, the number of classes.
    head : "last" or "all"
        "last": sequence -> one target, from each sequence's last step (its own,
        when lengths are given). "all": sequence -> sequence, every valid step.
    loss : "mse", "bce" or "ce"
        Mean squared error; binary cross-entropy on logits; softmax
        cross-entropy on logits with integer class targets.
    num_layers, dtype, seed, **lstm_options
        As :class:`fastlstm.LSTM` (``batch_first`` is always True here).
    backend : "fastlstm" or "reference"
        "reference" runs the LSTM through the NumPy reference (one layer, one
        direction, no options but the variants): the same training, to compare
        wall time.

    Notes
    -----
    x is (N, T, input_size). y is (N, output_size) for head "last" ((N,) class
    indices for "ce"), (N, T, output_size) for head "all" ((N, T) for "ce").
    ``flat_params`` / ``flat_grads`` hold the LSTM's and the head's parameters in
    one buffer each, so an optimizer is one pass.
    """

    def __init__(self, input_size, hidden_size, output_size, head="last", loss="mse",
                 num_layers=1, dtype=np.float32, seed=None, backend="fastlstm", **lstm_options):
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if "batch_first" in lstm_options:
            raise TypeError("SequenceModel takes batch-first data; batch_first is not an option")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
        self.output_size = check.positive_int("output_size", output_size)
        self.head, self.loss, self.backend = head, loss, backend
        seed = check.seed("seed", seed)
        self.lstm = BACKENDS[backend](input_size, hidden_size, num_layers=num_layers,
                                      dtype=check.dtype("dtype", dtype), seed=seed,
                                      batch_first=True, **lstm_options)
        # Validated values only (a NumPy integer is not JSON): what a checkpoint rebuilds from.
        layer = {k: v for k, v in self.lstm.config().items() if k != "batch_first"}
        self.config = dict(layer, output_size=self.output_size, head=head, loss=loss,
                           backend=backend)
        self.dtype = self.lstm.dtype
        F, O = self.lstm.output_size, self.output_size
        n_lstm = self.lstm.flat_params.size
        self.flat_params = aligned_empty(n_lstm + O * F + O, self.dtype)
        self.flat_grads = aligned_zeros(n_lstm + O * F + O, self.dtype)
        self.lstm.bind(self.flat_params[:n_lstm], self.flat_grads[:n_lstm])
        head_table = [("head.weight", (O, F)), ("head.bias", (O,))]
        head_p = carve(self.flat_params[n_lstm:], head_table)
        head_g = carve(self.flat_grads[n_lstm:], head_table)
        self.W, self.b = head_p["head.weight"], head_p["head.bias"]
        self.dW, self.db = head_g["head.weight"], head_g["head.bias"]
        bound = 1.0 / math.sqrt(F)                       # torch.nn.Linear's
        rng = np.random.default_rng(None if seed is None else [seed, 2])
        self.W[:] = rng.uniform(-bound, bound, self.W.shape)
        self.b[:] = rng.uniform(-bound, bound, self.b.shape)
        self.params = dict(self.lstm.params, **head_p)
        self.grads = dict(self.lstm.grads, **head_g)
        self._buf = Buffers(self.dtype)
        self._steps = {}       # x.shape -> _StepPlan
        self._guard = OneThread("SequenceModel")

    def __repr__(self):
        return (f"SequenceModel({self.lstm!r}, output_size={self.output_size}, "
                f"head={self.head!r}, loss={self.loss!r})")

    def zero_grad(self):
        """Set every gradient to zero."""
        self.flat_grads.fill(0)

    # -- one pass ----------------------------------------------------------

    def check_targets(self, y, N, T):
        """Raise, naming y, unless y fits N sequences of T steps for this head and loss."""
        if not isinstance(y, np.ndarray):
            raise TypeError(f"y must be a numpy.ndarray, got {type(y).__name__}")
        lead = (N,) if self.head == "last" else (N, T)
        if self.loss == "ce":
            if y.dtype.kind not in "iu":
                raise TypeError(f"y must hold integer class indices for loss='ce', "
                                f"got dtype {y.dtype}")
            check.shape("y", y, lead)
            if y.size and (y.min() < 0 or y.max() >= self.output_size):
                raise ValueError(f"y must hold class indices in [0, {self.output_size}), "
                                 f"got min {y.min()} and max {y.max()}")
        else:
            check.float_array("y", y, self.dtype)
            check.shape("y", y, lead + (self.output_size,))

    def check_inputs(self, x, lengths=None, state=None):
        """Raise, naming the argument, as the layer's forward would for x (N, T, I),
        lengths and state; writes nothing."""
        check.float_array("x", x, self.dtype)
        check.shape("x", x, ("B", "T", self.lstm.input_size))
        B, T = x.shape[:2]
        if T < 1 or B < 1:
            raise ValueError(f"x must have T >= 1 and B >= 1, got shape {x.shape}")
        check.lengths("lengths", lengths, B, T)
        if state is not None:
            h, c = check.pair("state", state)
            n = self.lstm.num_layers * self.lstm.num_directions
            P = self.lstm.output_size // self.lstm.num_directions
            for part, a, size in (("state[0] (h)", h, P),
                                  ("state[1] (c)", c, self.lstm.hidden_size)):
                check.float_array(part, a, self.dtype)
                check.shape(part, a, (n, B, size))

    def _last_only(self):
        """Whether the layer returns each sequence's last output only (return_sequences):
        where it runs in segments (recompute, evaluation), so that it never stores the
        T steps of y; elsewhere gathering here keeps the layer's plans."""
        return (self.head == "last" and self.backend == "fastlstm"
                and (self.lstm.recompute is not None or not self.lstm.training))

    def _head(self, x, lengths, state=None):
        """Forward through the LSTM and the head: (logits rows, features, time-major
        lengths, T, B, final state)."""
        if self._last_only():
            feats, final = self.lstm.forward(x, state, lengths=lengths,
                                             return_sequences=False)
            B, T = x.shape[:2]
            logits = self._buf.get("logits", (B, self.output_size))
            np.dot(feats, self.W.T, out=logits)
            _losses.add_bias(logits, self.b)
            return logits, feats, self.lstm.last_lengths, T, B, final
        y_seq, final = self.lstm.forward(x, state, lengths=lengths)
        y_tm = np.ascontiguousarray(y_seq.transpose(1, 0, 2))  # (T, B, F): already so for fastlstm
        T, B, F = y_tm.shape
        lens = self.lstm.last_lengths
        if self.head == "last":
            feats = self._buf.get("feats", (B, F))
            _losses.gather_last(y_tm, lens, feats)
        else:
            feats = y_tm.reshape(T * B, F)
        logits = self._buf.get("logits", (feats.shape[0], self.output_size))
        np.dot(feats, self.W.T, out=logits)
        _losses.add_bias(logits, self.b)
        return logits, feats, lens, T, B, final

    def _loss(self, logits, y, lens, T, B, grad):
        """Mean loss over the valid rows; its gradient on the logits into `grad`."""
        rows = logits.shape[0]
        valid = self._buf.get("valid", (rows,), np.uint8)
        if self.head == "last":
            valid.fill(1)
            target = y
        else:
            _losses.valid_steps(lens, T, valid)
            if self.loss == "ce":
                target = self._buf.get("target_i", (T, B), np.int64)
            else:
                target = self._buf.get("target", (T, B, self.output_size))
            np.copyto(target, y.swapaxes(0, 1), casting="same_kind")
            target = target.reshape(rows, -1) if self.loss != "ce" else target.reshape(rows)
        if self.loss == "ce":
            if target.dtype != np.int64 or not target.flags.c_contiguous:
                tbuf = self._buf.get("target_i64", target.shape, np.int64)
                np.copyto(tbuf, target)
                target = tbuf
            return _losses.cross_entropy(logits, target, valid, grad)
        if target.dtype != self.dtype or not target.flags.c_contiguous:
            tbuf = self._buf.get("target_f", target.shape)
            np.copyto(tbuf, target, casting="same_kind")
            target = tbuf
        fn = _losses.mse if self.loss == "mse" else _losses.bce_with_logits
        return fn(logits, target, valid, grad)

    def forward_backward(self, x, y, lengths=None, state=None):
        """Forward, loss and backward, adding into ``grads`` (no optimizer step).
        Returns (loss, the LSTM's final state as read-only views)."""
        with self._guard("forward_backward"):
            self.check_inputs(x, lengths, state)
            self.check_targets(y, x.shape[0], x.shape[1])
            return self._forward_backward(x, y, lengths, state)

    def _forward_backward(self, x, y, lengths, state):
        logits, feats, lens, T, B, final = self._head(x, lengths, state)
        dlogits = self._buf.get("dlogits", logits.shape)
        loss = self._loss(logits, y, lens, T, B, dlogits)
        # head gradients, then back into the LSTM
        dW = self._buf.get("dW", self.dW.shape)
        np.dot(dlogits.T, feats, out=dW)
        self.dW += dW
        db = self._buf.get("db", self.db.shape)
        np.sum(dlogits, axis=0, out=db)
        self.db += db
        dfeats = self._buf.get("dfeats", feats.shape)
        np.dot(dlogits, self.W, out=dfeats)
        if self._last_only():
            self.lstm.backward(dfeats, input_grad=False)
            return loss, final
        if self.head == "last":
            dy = self._buf.get("dy", (T, B, feats.shape[1]))
            _losses.scatter_last(dfeats, lens, dy)
        else:
            dy = dfeats.reshape(T, B, -1)
        self.lstm.backward(dy.transpose(1, 0, 2), input_grad=False)
        return loss, final

    def train_step(self, x, y, opt, lengths=None, clip_norm=None):
        """Forward, loss, backward, optional clipping and one optimizer step.

        After the first call at a shape it allocates nothing (no Numba or NumPy
        buffers) and runs no Python loop over steps or parameters. Returns the
        loss as a float. A loss that is not finite (NaN, inf) is returned without
        an update: the parameters and the optimizer keep the last finite step's.
        """
        with self._guard("train_step"):
            if isinstance(x, np.ndarray) and x.ndim == 3:    # else forward names x's problem
                self.check_targets(y, x.shape[0], x.shape[1])
            if getattr(opt, "model", None) is not self:
                raise ValueError("opt was built for another model")
            if clip_norm is not None:
                clip_norm = check.real("clip_norm", clip_norm, lo=0.0, lo_open=True)
            if (lengths is None and self.head == "last" and self.backend == "fastlstm"
                    and getattr(opt, "KIND", None) is not None):
                check.float_array("x", x, self.dtype)
                with self.lstm._guard("train_step"):
                    plan = self.lstm._enter_plan(x)
                    if plan is not None:
                        return self._fused_step(plan, x, y, opt, clip_norm)
            self.check_inputs(x, lengths)      # before the gradients are zeroed
            self.zero_grad()
            loss, _ = self._forward_backward(x, y, lengths, None)
            if not math.isfinite(loss):          # as the fused step: no update from it
                return float(loss)
            if clip_norm is not None:
                clip_grad_norm(self, clip_norm)
            opt.step()
            return float(loss)

    def _fused_step(self, plan, x, y, opt, clip_norm):
        """train_step as one kernel call (_step.train_step), x already in the plan."""
        sp = self._steps.get(x.shape)
        if sp is None:
            sp = self._steps[x.shape] = _StepPlan(self, plan)
        flags = y.flags                          # one flags object, not two
        if y.dtype != sp.target.dtype or not flags.c_contiguous or not flags.writeable:
            np.copyto(sp.target, y, casting="same_kind" if self.loss != "ce" else "unsafe")
            y = sp.target
        opt.next_scalars(sp.hyper)
        sp.hyper[MAX_NORM] = 0.0 if clip_norm is None else clip_norm
        sp.ints[RULE] = opt.KIND
        s1, s2 = opt.buffers
        return float(_step.train_step(self.flat_params, self.flat_grads, plan.ws, plan.lens, y,
                                      sp.valid, sp.scratch, s1, s2, sp.hyper, sp.ints,
                                      opt.count))

    #: bytes of workspace one block of rows of predict and evaluate may take: a larger x
    #: runs in blocks of rows (fastlstm train's 2560 validation sequences, T=110, H=64,
    #: would take 950 MB at once). The layer's own bound on a forward that keeps nothing:
    #: a block within it runs over all its steps at once, and the layer runs in segments
    #: (of steps, a compiled entry more on a first run) only the rows no block can bound.
    BLOCK_BYTES = LSTM.EVAL_SEGMENT_BYTES

    def _row_blocks(self, x, lengths):
        """(row slices, lengths as int64 or None): one slice when x fits BLOCK_BYTES (or is
        not an array the layer would take: its forward then says why)."""
        if (not isinstance(x, np.ndarray) or x.ndim != 3 or 0 in x.shape
                or not hasattr(self.lstm, "workspace_bytes")):
            return [slice(None)], lengths
        N, T = x.shape[:2]
        rows = max(1, self.BLOCK_BYTES // max(self.lstm.workspace_bytes(T, 1), 1))
        if N <= rows:
            return [slice(None)], lengths
        if lengths is not None:
            lengths = check.lengths("lengths", lengths, N, T)
        return [slice(i, i + rows) for i in range(0, N, rows)], lengths

    def evaluate(self, x, y, lengths=None):
        """The mean loss, in evaluation mode (no dropout), without gradients. A large x
        runs in blocks of rows (``BLOCK_BYTES``): the mean of the blocks' means,
        weighted by their loss terms."""
        with self._guard("evaluate"):
            if isinstance(x, np.ndarray) and x.ndim == 3:
                self.check_targets(y, x.shape[0], x.shape[1])
            blocks, lengths = self._row_blocks(x, lengths)
            mode = self.lstm.training
            self.lstm.eval()
            try:
                total = terms = 0.0
                for s in blocks:
                    logits, _, lens, T, B, _ = self._head(
                        x[s], None if lengths is None else lengths[s])
                    scratch = self._buf.get("dlogits", logits.shape)
                    loss = float(self._loss(logits, y[s], lens, T, B, scratch))
                    if len(blocks) == 1:
                        return loss
                    n = B if self.head == "last" else int(np.sum(lens))
                    total += loss * n
                    terms += n
                return total / terms
            finally:
                self.lstm.train(mode)

    def predict(self, x, lengths=None, state=None):
        """Outputs for x, in evaluation mode: values (mse), probabilities (bce), or
        class probabilities (ce); (N, O) for head "last", (N, T, O) for "all". A large x
        runs in blocks of rows (``BLOCK_BYTES``). state: the LSTM's initial (h, c), as
        its forward takes them."""
        with self._guard("predict"):
            if state is not None:
                self.check_inputs(x, lengths, state)
            blocks, lengths = self._row_blocks(x, lengths)
            if len(blocks) > 1:
                return np.concatenate([self._predict(
                    x[s], lengths if lengths is None else lengths[s],
                    None if state is None else (state[0][:, s], state[1][:, s]))
                    for s in blocks])
            return self._predict(x, lengths, state)

    def _predict(self, x, lengths, state=None):
        mode = self.lstm.training
        self.lstm.eval()
        try:
            logits, _, _, T, B, _ = self._head(x, lengths, state)
        finally:
            self.lstm.train(mode)
        z = logits.astype(np.float64)
        if self.loss == "bce":
            out = 0.5 * (1.0 + np.tanh(0.5 * z))
        elif self.loss == "ce":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            out = e / e.sum(axis=1, keepdims=True)
        else:
            out = z
        out = out.astype(self.dtype)
        return out if self.head == "last" else out.reshape(T, B, -1).transpose(1, 0, 2).copy()

    # -- training loop and checkpoints (their own modules) ---------------------

    def fit(self, x, y, optimizer, epochs=10, batch_size=32, validation=None, shuffle=True,
            seed=0, progress=True, bptt=None, lengths=None, clip_norm=None, patience=None,
            max_seconds=None, plot=None):
        """Train over minibatches of (x, y); returns a history dict.

        Parameters
        ----------
        validation : (x_val, y_val) or (x_val, y_val, lengths_val), optional
            Its loss is reported after every epoch.
        shuffle, seed
            Minibatches are drawn from a permutation seeded by `seed`.
        progress : bool
            A progress bar (tqdm) with the loss and the sequences per second.
        bptt : int, optional
            Truncated backpropagation through time: each minibatch runs in chunks of
            `bptt` steps, the state carried from chunk to chunk and the gradient cut
            at chunk borders (one optimizer step per chunk that has a loss).
        clip_norm : float, optional
            Clip the gradient norm before every step.
        patience : int, optional
            Early stopping: stop when the validation loss has not improved for this
            many epochs, and restore the best parameters.
        max_seconds : float, optional
            Stop after the epoch during which this much time has passed.
        plot : str, optional
            Write the training (and validation) loss per epoch to this image file
            (``fastlstm.plot_history``; needs matplotlib: ``pip install 'fastlstm[plot]'``).

        Raises
        ------
        FloatingPointError
            When the loss becomes NaN or infinite (lower the learning rate or clip).
        """
        if plot is not None:
            from .plot import _pyplot
            _pyplot()                # no matplotlib: say so before training, not after
        with self._guard("fit"):
            history = training.fit(self, x, y, optimizer, epochs=epochs,
                                   batch_size=batch_size, validation=validation,
                                   shuffle=shuffle, seed=seed, progress=progress, bptt=bptt,
                                   lengths=lengths, clip_norm=clip_norm, patience=patience,
                                   max_seconds=max_seconds)
        if plot is not None:
            from .plot import plot_history
            plot_history(history, plot)
        return history

    def save(self, path, optimizer=None):
        """Write config, parameters and (optionally) the optimizer's state to one
        ``.npz``, atomically: a temporary file in the same folder, then a rename."""
        with self._guard("save"):
            checkpoint.save(self, path, optimizer)


def load(path, with_optimizer=False):
    """Read a checkpoint written by ``SequenceModel.save``.

    Every key, shape and dtype is checked before a model is returned; a
    corrupted, truncated or mismatched file raises ``ValueError`` (or
    ``FileNotFoundError``) and nothing is loaded. With ``with_optimizer`` returns
    ``(model, optimizer)``, the optimizer restored (None if none was saved).
    """
    return checkpoint.load(path, SequenceModel, param_shapes, with_optimizer)


_CONFIG_KEYS = ({"input_size", "hidden_size", "dtype", "seed", "threads"} | set(_options.DEFAULTS)
                | {"output_size", "head", "loss", "backend"})


def param_shapes(config, count=None):
    """{name: shape} of the parameters of the SequenceModel that ``config`` (as in a
    checkpoint) describes, computed from the sizes without building it; TypeError or
    ValueError for a config that would not build, or (with `count`) that does not
    describe `count` parameter arrays."""
    layer = dict(config)
    unknown = sorted(set(layer) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    output_size = check.positive_int("output_size", layer.pop("output_size", None))
    for key, allowed in (("head", HEADS), ("loss", LOSSES), ("backend", tuple(BACKENDS))):
        value = layer.pop(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
    c = _options.layer_config(**layer)
    H, D = c["hidden_size"], 2 if c["bidirectional"] else 1
    P = c["proj_size"] or H
    flags = _options.param_flags(c)
    n = c["num_layers"] * D * len(_layout.param_table(1, H, P, *flags)) + 2
    if count is not None and n != count and n > 10 * count + 1000:   # before n names are made
        raise ValueError(f"it describes {n} parameter arrays, the file holds {count}")
    check.affordable(c["num_layers"] * D * _layout.param_size(max(c["input_size"], D * P), H, P,
                                                              *flags),
                     c["dtype"], "the parameters its config describes")
    _, names = _layout.layer_blocks(c["input_size"], H, P, c["num_layers"], D, *flags)
    return dict(names, **{"head.weight": (output_size, D * P), "head.bias": (output_size,)})
