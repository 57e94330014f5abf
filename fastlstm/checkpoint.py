"""Checkpoints: a model's configuration, parameters, dropout generator and
(optionally) optimizer state in one ``.npz``, written atomically and checked
whole before anything is loaded."""
import json
import os
import tempfile
import zipfile

import numpy as np

from .optim import SGD, Adam, AdamW, RMSprop

__all__ = ["save", "load"]

FORMAT = 1
OPTIMIZERS = {c.__name__: c for c in (SGD, Adam, AdamW, RMSprop)}


def save(model, path, optimizer=None):
    """Write `model` (anything with ``config``, ``params`` and ``lstm``'s generator
    state) and `optimizer` to `path` through a temporary file and a rename."""
    arrays = {"format": np.array(FORMAT), "config": np.array(json.dumps(model.config))}
    arrays.update({f"param/{k}": v for k, v in model.params.items()})
    arrays["dropout_rng"] = np.array(json.dumps(model.lstm.get_rng_state()))
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


def load(path, build, with_optimizer=False):
    """Read a checkpoint written by ``save``; `build(**config)` makes the model.

    Every key, shape and dtype is checked before anything is written; a
    corrupted, truncated or mismatched file raises ``ValueError`` (or
    ``FileNotFoundError``). With `with_optimizer` returns ``(model, optimizer)``.
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

    if int(need("format")) != FORMAT:
        raise ValueError(f"{path}: checkpoint format {int(data['format'])}, expected {FORMAT}")
    try:
        config = json.loads(str(need("config")))
        model = build(**config)
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
        if name not in OPTIMIZERS:
            raise ValueError(f"{path}: unknown optimizer {name!r}")
        hyper = json.loads(str(need("opt/hyper")))
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        opt = OPTIMIZERS[name](model, **hyper)
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
    model.lstm.set_rng_state(rng_state)
    return (model, opt) if with_optimizer else model
