"""Checkpoints: a model's configuration, parameters, dropout generator and
(optionally) optimizer state in one ``.npz``, written atomically and checked
whole before anything is loaded."""
import json
import math
import os
import zipfile

import numpy as np

from ._shared import atomic_write
from .optim import OPTIMIZERS

__all__ = ["save", "load"]

FORMAT = 1


def save(model, path, optimizer=None):
    """Write `model` (anything with ``config``, ``params`` and ``lstm``'s generator
    state) and `optimizer` to `path` through a temporary file and a rename
    (_shared.atomic_write)."""
    if optimizer is not None and getattr(optimizer, "model", None) is not model:
        raise ValueError("optimizer was built for another model: its state would not load "
                         "with this one (save(path, optimizer=...) takes this model's)")
    arrays = {"format": np.array(FORMAT), "config": np.array(json.dumps(model.config))}
    arrays.update({f"param/{k}": v for k, v in model.params.items()})
    arrays["dropout_rng"] = np.array(json.dumps(model.lstm.get_rng_state()))
    if optimizer is not None:
        sd = optimizer.state_dict()
        arrays["opt/type"] = np.array(sd["type"])
        arrays["opt/hyper"] = np.array(json.dumps(sd["hyper"]))
        arrays["opt/steps"] = np.array(sd["steps"])
        arrays.update({f"opt/state/{k}": v for k, v in sd["state"].items()})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _json(path, data, key, kind):
    """data[key] parsed as JSON of type `kind`, or a ValueError naming the file."""
    a = data[key]
    try:
        if a.shape != () or a.dtype.kind != "U":
            raise ValueError(f"a {a.dtype}{a.shape} array, not a string")
        value = json.loads(str(a))
        if not isinstance(value, kind):
            raise ValueError(f"JSON of type {type(value).__name__}, not {kind.__name__}")
    except ValueError as e:
        raise ValueError(f"{path}: {key!r} is not valid: {e}") from None
    return value


def _known(key):
    return (key in ("format", "config", "dropout_rng", "opt/type", "opt/hyper", "opt/steps")
            or key.startswith(("param/", "opt/state/")))


def load(path, build, shapes, with_optimizer=False):
    """Read a checkpoint written by ``save``; `shapes(config, count)` gives the
    parameters' {name: shape} a config describes (raising TypeError or ValueError for
    a bad one, or one that does not describe `count` arrays), `build(**config)` makes
    the model.

    The whole file is checked before a model is built: its keys, its config against
    the stored arrays' shapes and dtypes, the generator's and the optimizer's state.
    A file that is not a fastlstm checkpoint, or is corrupted, truncated or
    mismatched, raises ``ValueError`` naming the file and what is wrong (or
    ``FileNotFoundError``). With `with_optimizer` returns ``(model, optimizer)``.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":        # every .npz is a zip archive
                raise ValueError("it is not an .npz archive")
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

    fmt = need("format")
    if fmt.shape != () or fmt.dtype.kind not in "iu" or int(fmt) != FORMAT:
        raise ValueError(f"{path}: 'format' is {fmt!r}, expected the integer {FORMAT}")
    unknown = sorted(k for k in data if not _known(k))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}: not written by fastlstm's save")
    need("config")
    config = _json(path, data, "config", dict)
    try:
        present = {k for k in data if k.startswith("param/")}
        expected = {f"param/{k}": v for k, v in shapes(config, len(present)).items()}
        dtype = np.dtype(config.get("dtype", "float32"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config does not describe a model: {e}") from None
    if present != set(expected):
        differ = sorted(present ^ set(expected))
        raise ValueError(f"{path}: parameters {differ[:8]}{' ...' if len(differ) > 8 else ''} "
                         "do not match the model its config describes")
    for k, shape in expected.items():
        a = data[k]
        if a.shape != shape or a.dtype != dtype:
            raise ValueError(f"{path}: {k} is {a.dtype}{a.shape}, expected {dtype}{shape}")
    rng_state = _json(path, data, "dropout_rng", dict)
    try:
        np.random.default_rng().bit_generator.state = rng_state
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: 'dropout_rng' is not a generator state: {e!r}") from None
    opt_keys = sorted(k for k in data if k.startswith("opt/"))
    if opt_keys:
        name = need("opt/type")
        if name.shape != () or str(name) not in OPTIMIZERS:
            raise ValueError(f"{path}: unknown optimizer {name!r} (known: {sorted(OPTIMIZERS)})")
        name = str(name)
        hyper = _json(path, data, "opt/hyper", dict)
        steps = need("opt/steps")
        if steps.shape != () or steps.dtype.kind not in "iu" or int(steps) < 0:
            raise ValueError(f"{path}: 'opt/steps' is {steps!r}, expected an integer >= 0")
        states = {k[len("opt/state/"):] for k in opt_keys if k.startswith("opt/state/")}
        if states != set(OPTIMIZERS[name].STATE):
            raise ValueError(f"{path}: optimizer state {sorted(states)}, expected "
                             f"{sorted(OPTIMIZERS[name].STATE)} for {name}")
        n = sum(math.prod(s) for s in expected.values())
        for k in states:
            a = data[f"opt/state/{k}"]
            if a.shape != (n,) or a.dtype != dtype:
                raise ValueError(f"{path}: optimizer state {k} is {a.dtype}{a.shape}, expected "
                                 f"{dtype}({n},)")
    # the file is consistent: build, then write
    try:
        model = build(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config does not build a model: {e}") from None
    opt = None
    if with_optimizer and opt_keys:
        # JSON keeps tuples (Adam's betas) as lists
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}
        try:
            opt = OPTIMIZERS[name](model, **hyper)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: 'opt/hyper' does not build the optimizer {name}: "
                             f"{e}") from None
        state = {k: data[f"opt/state/{k}"] for k in opt.STATE}
        opt.load_state_dict(dict(type=name, hyper=hyper, steps=int(steps), state=state))
    for k in expected:
        model.params[k[len("param/"):]][...] = data[k]
    model.lstm.set_rng_state(rng_state)
    return (model, opt) if with_optimizer else model
