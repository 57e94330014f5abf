"""The training loop behind ``SequenceModel.fit``: minibatches, truncated BPTT,
early stopping, a time limit and a progress bar. It drives a model through its
public methods only (``train_step``, ``forward_backward``, ``evaluate``, ``lstm``)."""
import math
import time

import numpy as np

from . import _validate as check
from .optim import clip_grad_norm

__all__ = ["fit"]


def fit(model, x, y, optimizer, epochs=10, batch_size=32, validation=None, shuffle=True,
        seed=0, progress=True, bptt=None, lengths=None, clip_norm=None, patience=None,
        max_seconds=None, part=None, agree=None):
    """Train `model` over minibatches of (x, y); returns a history dict.
    ``SequenceModel.fit`` documents the arguments. `part(indices)` picks the
    indices this process works on, of every minibatch and of the validation set
    (data-parallel training: its share); None keeps all. `agree(decision)` makes
    a decision of this process's (the time limit) everyone's."""
    N, T = _check_data(model, ("x", "y", "lengths"), x, y, lengths)
    batch_size = check.positive_int("batch_size", batch_size)
    epochs = check.positive_int("epochs", epochs)
    seed = check.nonnegative_int("seed", seed)
    if bptt is not None:
        bptt = check.positive_int("bptt", bptt)
        if lengths is not None:
            raise ValueError("bptt does not combine with lengths")
    if lengths is not None:
        lengths = check.lengths("lengths", lengths, N, T)
    if clip_norm is not None:
        clip_norm = check.real("clip_norm", clip_norm, lo=0.0, lo_open=True)
    if patience is not None:
        patience = check.positive_int("patience", patience)
        if validation is None:
            raise ValueError("patience (early stopping) needs validation data")
    if max_seconds is not None:
        max_seconds = check.real("max_seconds", max_seconds, lo=0.0, lo_open=True)
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) not in (2, 3):
            raise TypeError("validation must be a tuple (x_val, y_val) or (x_val, y_val, "
                            f"lengths_val), got {type(validation).__name__}")
        # checked whole now: a bad one found after the first epoch had changed the model
        _check_data(model, ("validation[0] (x)", "validation[1] (y)", "validation[2] (lengths)"),
                    *validation)
    if part is not None and validation is not None:
        keep = part(np.arange(len(validation[0])))
        validation = tuple(None if v is None else v[keep] for v in validation)
    rng = np.random.default_rng(seed)
    history = dict(loss=[], val_loss=[], epoch_seconds=[], steps=0)
    best, best_params, waited = math.inf, None, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs * math.ceil(N / batch_size), unit="batch", leave=False,
                   disable=None)        # None: off when stderr is not a terminal
    start = time.perf_counter()
    seen = 0              # sequences this process trained on, for the bar's rate
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            order = rng.permutation(N) if shuffle else np.arange(N)
            losses = []
            for s in range(0, N, batch_size):
                idx = order[s:s + batch_size]
                if part is not None:
                    idx = part(idx)
                xb, yb = x[idx], y[idx]
                lb = None if lengths is None else lengths[idx]
                loss = (bptt_step(model, xb, yb, optimizer, bptt, clip_norm) if bptt
                        else model.train_step(xb, yb, optimizer, lengths=lb, clip_norm=clip_norm))
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
                    seen += len(idx)
                    bar.set_postfix(loss=f"{loss:.4g}", seq_per_s=f"{seen / el:.0f}")
            history["loss"].append(float(np.mean(losses)))
            if validation is not None:
                v = model.evaluate(*validation)
                history["val_loss"].append(v)
                if patience is not None:
                    if v < best:
                        best, best_params, waited = v, model.flat_params.copy(), 0
                    else:
                        waited += 1
                        if waited >= patience:
                            model.flat_params[:] = best_params
                            history["stopped_early"] = epoch + 1
                            history["epoch_seconds"].append(time.perf_counter() - t0)
                            break
            history["epoch_seconds"].append(time.perf_counter() - t0)
            if max_seconds is not None:
                late = time.perf_counter() - start > max_seconds
                if agree(late) if agree is not None else late:
                    break
    finally:
        if bar is not None:
            bar.close()
    return history


def _check_data(model, names, x, y, lengths=None):
    """Raise, naming the argument, unless (x, y, lengths) is a data set for `model`;
    returns x's N, T."""
    check.float_array(names[0], x, model.dtype)
    I = model.lstm.input_size
    if x.ndim != 3 or x.shape[2] != I:
        raise ValueError(f"{names[0]} must have shape (N, T, {I}), got {x.shape}")
    N, T = x.shape[:2]
    if N < 1 or T < 1:
        raise ValueError(f"{names[0]} must hold at least one sequence of at least one step, "
                         f"got shape {x.shape}")
    try:
        model.check_targets(y, N, T)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("y must", f"{names[1]} must", 1)) from None
    check.lengths(names[2], lengths, N, T)
    return N, T


def bptt_step(model, x, y, opt, K, clip_norm):
    """One minibatch in chunks of K steps, the state carried and the gradient cut
    at chunk borders; one optimizer step per chunk with a loss. Returns the mean
    chunk loss."""
    T = x.shape[1]
    state, losses = None, []
    for k in range(0, T, K):
        last = k + K >= T
        xc = x[:, k:k + K]
        if model.head == "all" or last:
            yc = y[:, k:k + K] if model.head == "all" else y
            model.zero_grad()
            loss, (h_n, c_n) = model.forward_backward(xc, yc, state=state)
            if clip_norm is not None:
                clip_grad_norm(model, clip_norm)
            opt.step()
            losses.append(float(loss))
        else:
            _, (h_n, c_n) = model.lstm.forward(xc, state)
        state = (h_n.copy(), c_n.copy())
    return float(np.mean(losses))
