"""SequenceModel: an LSTM, a linear head and a loss, with a one-call training step,
``fit``, and checkpoints."""
import json
import math
import os
import tempfile
import time
import zipfile

import numpy as np

from . import _losses
from . import _validate as check
from .lstm import LSTM, _Buffers
from .optim import SGD, Adam, AdamW, RMSprop, clip_grad_norm
from .reference import ReferenceLSTM

__all__ = ["SequenceModel", "load"]

HEADS = ("last", "all")
LOSSES = ("mse", "bce", "ce")
_OPTIMIZERS = {c.__name__: c for c in (SGD, Adam, AdamW, RMSprop)}
_FORMAT = 1


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
        direction, no options): the same training, to compare wall time.

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
        self.output_size = check.positive_int("output_size", output_size)
        self.head, self.loss = head, loss
        if backend == "fastlstm":
            self.lstm = LSTM(input_size, hidden_size, num_layers=num_layers, dtype=dtype,
                             seed=seed, batch_first=True, **lstm_options)
        elif backend == "reference":
            extra = {k: v for k, v in lstm_options.items() if k != "forget_bias"}
            if num_layers != 1 or extra:
                raise ValueError(f"the reference backend is one plain layer; got num_layers="
                                 f"{num_layers} and {extra}")
            self.lstm = ReferenceLSTM(input_size, hidden_size, dtype=check.dtype("dtype", dtype),
                                      seed=seed, batch_first=True)
            fb = lstm_options.get("forget_bias", 0.0)
            self.lstm.params["bias_ih_l0"][hidden_size:2 * hidden_size] += fb
        else:
            raise ValueError(f"backend must be 'fastlstm' or 'reference', got {backend!r}")
        self.backend = backend
        self.config = dict(input_size=input_size, hidden_size=hidden_size,
                           output_size=output_size, head=head, loss=loss, num_layers=num_layers,
                           dtype=self.lstm.dtype.name, seed=seed, backend=backend,
                           **lstm_options)
        self.dtype = self.lstm.dtype
        F, O = self.lstm.output_size, self.output_size
        n_lstm = self.lstm.flat_params.size
        self.flat_params = np.empty(n_lstm + O * F + O, self.dtype)
        self.flat_grads = np.zeros_like(self.flat_params)
        self.lstm._bind(self.flat_params[:n_lstm], self.flat_grads[:n_lstm])
        self.W = self.flat_params[n_lstm:n_lstm + O * F].reshape(O, F)
        self.b = self.flat_params[n_lstm + O * F:]
        self.dW = self.flat_grads[n_lstm:n_lstm + O * F].reshape(O, F)
        self.db = self.flat_grads[n_lstm + O * F:]
        bound = 1.0 / math.sqrt(F)                       # torch.nn.Linear's
        rng = np.random.default_rng(None if seed is None else [seed, 2])
        self.W[:] = rng.uniform(-bound, bound, self.W.shape)
        self.b[:] = rng.uniform(-bound, bound, self.b.shape)
        self.params = dict(self.lstm.params, **{"head.weight": self.W, "head.bias": self.b})
        self.grads = dict(self.lstm.grads, **{"head.weight": self.dW, "head.bias": self.db})
        self._buf = _Buffers(self.dtype)

    def __repr__(self):
        return (f"SequenceModel({self.lstm!r}, output_size={self.output_size}, "
                f"head={self.head!r}, loss={self.loss!r})")

    def zero_grad(self):
        """Set every gradient to zero."""
        self.flat_grads.fill(0)

    # -- one pass ----------------------------------------------------------

    def _check_targets(self, y, N, T):
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

    def _head(self, x, lengths, state=None):
        """Forward through the LSTM and the head: (logits rows, features, time-major
        lengths, T, B, final state)."""
        y_seq, final = self.lstm.forward(x, state, lengths=lengths)
        y_tm = np.ascontiguousarray(y_seq.transpose(1, 0, 2))  # (T, B, F): already so for fastlstm
        T, B, F = y_tm.shape
        lens = self.lstm._last[2]
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

    def _forward_backward(self, x, y, lengths, state=None):
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
        if self.head == "last":
            dy = self._buf.get("dy", (T, B, feats.shape[1]))
            _losses.scatter_last(dfeats, lens, dy)
        else:
            dy = dfeats.reshape(T, B, -1)
        self.lstm.backward(dy.transpose(1, 0, 2))
        return loss, final

    def train_step(self, x, y, opt, lengths=None, clip_norm=None):
        """Forward, loss, backward, optional clipping and one optimizer step.

        After the first call at a shape it allocates nothing (no Numba or NumPy
        buffers) and runs no Python loop over steps or parameters. Returns the
        loss as a float.
        """
        if isinstance(x, np.ndarray) and x.ndim == 3:    # else forward names x's problem
            self._check_targets(y, x.shape[0], x.shape[1])
        if opt.model is not self:
            raise ValueError("opt was built for another model")
        self.zero_grad()
        loss, _ = self._forward_backward(x, y, lengths)
        if clip_norm is not None:
            clip_grad_norm(self, clip_norm)
        opt.step()
        return float(loss)

    def evaluate(self, x, y, lengths=None):
        """The mean loss, in evaluation mode (no dropout), without gradients."""
        if isinstance(x, np.ndarray) and x.ndim == 3:
            self._check_targets(y, x.shape[0], x.shape[1])
        mode = self.lstm.training
        self.lstm.eval()
        try:
            logits, _, lens, T, B, _ = self._head(x, lengths)
            scratch = self._buf.get("dlogits", logits.shape)
            return float(self._loss(logits, y, lens, T, B, scratch))
        finally:
            self.lstm.train(mode)

    def predict(self, x, lengths=None):
        """Outputs for x, in evaluation mode: values (mse), probabilities (bce), or
        class probabilities (ce); (N, O) for head "last", (N, T, O) for "all"."""
        mode = self.lstm.training
        self.lstm.eval()
        try:
            logits, _, _, T, B, _ = self._head(x, lengths)
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

    # -- fit -----------------------------------------------------------------

    def fit(self, x, y, optimizer, epochs=10, batch_size=32, validation=None, shuffle=True,
            seed=0, progress=True, bptt=None, lengths=None, clip_norm=None, patience=None,
            max_seconds=None):
        """Train over minibatches of (x, y); returns a history dict.

        Parameters
        ----------
        validation : (x_val, y_val) or (x_val, y_val, lengths_val), optional
            Its loss is reported after every epoch.
        shuffle, seed
            Minibatches are drawn from a permutation seeded by `seed`.
        progress : bool
            A progress bar (tqdm) with the loss and steps per second.
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

        Raises
        ------
        FloatingPointError
            When the loss becomes NaN or infinite (lower the learning rate or clip).
        """
        check.float_array("x", x, self.dtype)
        if x.ndim != 3:
            raise ValueError(f"x must have shape (N, T, {self.lstm.input_size}), got {x.shape}")
        N, T = x.shape[:2]
        self._check_targets(y, N, T)
        batch_size = check.positive_int("batch_size", batch_size)
        epochs = check.positive_int("epochs", epochs)
        if bptt is not None:
            bptt = check.positive_int("bptt", bptt)
            if lengths is not None:
                raise ValueError("bptt does not combine with lengths")
        lengths = None if lengths is None else np.asarray(lengths)
        if patience is not None and validation is None:
            raise ValueError("patience (early stopping) needs validation data")
        rng = np.random.default_rng(seed)
        history = dict(loss=[], val_loss=[], epoch_seconds=[], steps=0)
        best, best_params, waited = math.inf, None, 0
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs * math.ceil(N / batch_size), unit="batch", leave=False,
                       disable=None)        # None: off when stderr is not a terminal
        start = time.perf_counter()
        try:
            for epoch in range(epochs):
                t0 = time.perf_counter()
                order = rng.permutation(N) if shuffle else np.arange(N)
                losses = []
                for s in range(0, N, batch_size):
                    idx = np.sort(order[s:s + batch_size]) if not shuffle else order[s:s + batch_size]
                    xb, yb = x[idx], y[idx]
                    lb = None if lengths is None else lengths[idx]
                    loss = (self._bptt_step(xb, yb, optimizer, bptt, clip_norm) if bptt
                            else self.train_step(xb, yb, optimizer, lengths=lb,
                                                 clip_norm=clip_norm))
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"the training loss became {loss} at epoch {epoch + 1}, step "
                            f"{history['steps'] + 1}: lower the learning rate or clip "
                            f"gradients (clip_norm=...)")
                    losses.append(loss)
                    history["steps"] += 1
                    if bar is not None:
                        bar.update(1)
                        el = time.perf_counter() - start
                        bar.set_postfix(loss=f"{loss:.4g}", steps_per_s=f"{history['steps'] / el:.0f}")
                history["loss"].append(float(np.mean(losses)))
                if validation is not None:
                    v = self.evaluate(*validation)
                    history["val_loss"].append(v)
                    if patience is not None:
                        if v < best:
                            best, best_params, waited = v, self.flat_params.copy(), 0
                        else:
                            waited += 1
                            if waited >= patience:
                                self.flat_params[:] = best_params
                                history["stopped_early"] = epoch + 1
                                history["epoch_seconds"].append(time.perf_counter() - t0)
                                break
                history["epoch_seconds"].append(time.perf_counter() - t0)
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    break
        finally:
            if bar is not None:
                bar.close()
        return history

    def _bptt_step(self, x, y, opt, K, clip_norm):
        """One minibatch in chunks of K steps; returns the mean chunk loss."""
        T = x.shape[1]
        state, losses = None, []
        for k in range(0, T, K):
            last = k + K >= T
            xc = x[:, k:k + K]
            if self.head == "all" or last:
                yc = y[:, k:k + K] if self.head == "all" else y
                self.zero_grad()
                loss, (h_n, c_n) = self._forward_backward(xc, yc, None, state)
                if clip_norm is not None:
                    clip_grad_norm(self, clip_norm)
                opt.step()
                losses.append(float(loss))
            else:
                _, (h_n, c_n) = self.lstm.forward(xc, state)
            state = (h_n.copy(), c_n.copy())
        return float(np.mean(losses))

    # -- checkpoints ---------------------------------------------------------

    def save(self, path, optimizer=None):
        """Write config, parameters and (optionally) the optimizer's state to one
        ``.npz``, atomically: a temporary file in the same folder, then a rename."""
        arrays = {"format": np.array(_FORMAT), "config": np.array(json.dumps(self.config))}
        arrays.update({f"param/{k}": v for k, v in self.params.items()})
        arrays["dropout_rng"] = np.array(json.dumps(self.lstm._dropout_rng.bit_generator.state))
        if optimizer is not None:
            sd = optimizer.state_dict()
            arrays["opt/type"] = np.array(sd["type"])
            arrays["opt/hyper"] = np.array(json.dumps(sd["hyper"]))
            arrays["opt/steps"] = np.array(sd["steps"])
            arrays.update({f"opt/state/{k}": v for k, v in sd["state"].items()})
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".fastlstm-", suffix=".npz.tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def load(path, with_optimizer=False):
    """Read a checkpoint written by ``SequenceModel.save``.

    Every key, shape and dtype is checked before a model is returned; a
    corrupted, truncated or mismatched file raises ``ValueError`` (or
    ``FileNotFoundError``) and nothing is loaded. With ``with_optimizer`` returns
    ``(model, optimizer)``, the optimizer restored (None if none was saved).
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ValueError(f"{path} is not a readable fastlstm checkpoint: {e}") from None

    def need(key):
        if key not in data:
            raise ValueError(f"{path} is not a complete fastlstm checkpoint: no {key!r}")
        return data[key]

    if int(need("format")) != _FORMAT:
        raise ValueError(f"{path}: checkpoint format {int(data['format'])}, expected {_FORMAT}")
    try:
        config = json.loads(str(need("config")))
        model = SequenceModel(**config)
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: its config does not build a model: {e}") from None
    expected = {f"param/{k}": v for k, v in model.params.items()}
    present = {k for k in data if k.startswith("param/")}
    if present != set(expected):
        raise ValueError(f"{path}: parameters {sorted(present ^ set(expected))} do not match "
                         f"the model its config describes")
    for k, v in expected.items():
        a = data[k]
        if a.shape != v.shape or a.dtype != v.dtype:
            raise ValueError(f"{path}: {k} is {a.dtype}{a.shape}, expected {v.dtype}{v.shape}")
    opt = None
    if with_optimizer and "opt/type" in data:
        name = str(data["opt/type"])
        if name not in _OPTIMIZERS:
            raise ValueError(f"{path}: unknown optimizer {name!r}")
        hyper = json.loads(str(need("opt/hyper")))
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        opt = _OPTIMIZERS[name](model, **hyper)
        state = {k: need(f"opt/state/{k}") for k in opt.STATE}
        for k, a in state.items():
            if a.shape != opt.state[k].shape or a.dtype != opt.state[k].dtype:
                raise ValueError(f"{path}: optimizer state {k} is {a.dtype}{a.shape}, expected "
                                 f"{opt.state[k].dtype}{opt.state[k].shape}")
        opt.load_state_dict(dict(type=name, hyper=hyper, steps=int(need("opt/steps")),
                                 state=state))
    rng_state = json.loads(str(need("dropout_rng")))
    # everything checked: now write
    for k, v in expected.items():
        v[...] = data[k]
    model.lstm._dropout_rng.bit_generator.state = rng_state
    return (model, opt) if with_optimizer else model
