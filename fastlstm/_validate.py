"""Argument checks shared by the public API.

Each check raises before anything is written, with a message that names the
argument, what was expected and what was given.
"""
import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def dtype(name, value):
    """The model dtype: float32 or float64."""
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {value!r}")
    return dt


def positive_int(name, value):
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def float_array(name, a, model_dtype):
    """An ndarray of any floating dtype; it is cast to the model's dtype when copied.

    Integer, bool, complex and object arrays are refused rather than cast: they
    are almost always a mistake (labels passed as inputs, say).
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype (it is cast to the model's "
                        f"{model_dtype}), got dtype {a.dtype}")
    return a


def shape(name, a, expected):
    """Check ``a.shape`` against ``expected``, whose entries are ints or names of free sizes."""
    def fmt(shape):
        return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"

    ok = a.ndim == len(expected) and all(
        isinstance(e, str) or e == s for e, s in zip(expected, a.shape))
    if not ok:
        raise ValueError(f"{name} must have shape {fmt(expected)}, got {fmt(a.shape)}")


def pair(name, value):
    """A (h, c) pair."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a tuple (h, c) of two arrays, got {type(value).__name__}"
                        + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else ""))
    return value
