"""Argument checks shared by the public API.

Each check raises before anything is written, with a message that names the
argument, what was expected and what was given.
"""
import operator

import numpy as np

from ._shared import aligned_empty

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


def integer(name, value, minimum):
    """An int (or NumPy integer) of at least `minimum`; a bool is not taken for one."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def positive_int(name, value):
    return integer(name, value, 1)


def nonnegative_int(name, value):
    return integer(name, value, 0)


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

    ok = a.ndim == len(expected)
    if ok:
        for e, n in zip(expected, a.shape):          # a loop, not all(...): called per call
            if not (isinstance(e, str) or e == n):
                ok = False
                break
    if not ok:
        raise ValueError(f"{name} must have shape {fmt(expected)}, got {fmt(a.shape)}")


def pair(name, value):
    """A (h, c) pair."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a tuple (h, c) of two arrays, got {type(value).__name__}"
                        + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else ""))
    return value


def boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def real(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite real number, optionally within bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                       np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    low_bad = lo is not None and (v <= lo if lo_open else v < lo)
    high_bad = hi is not None and (v >= hi if hi_open else v > hi)
    if not np.isfinite(v) or low_bad or high_bad:
        rng = ("(" if lo_open else "[") + (str(lo) if lo is not None else "-inf") + ", " + \
              (str(hi) if hi is not None else "inf") + (")" if hi_open or hi is None else "]")
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")
    return v


def lengths(name, value, B, T):
    """None, or B integers in [1, T] as a contiguous, writable int64 array (a copy
    unless it is one already)."""
    if value is None:
        return None
    a = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if a is None:
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one length per sequence), "
                         f"got {a.shape}")
    if a.min() < 1 or a.max() > T:
        raise ValueError(f"{name} must lie in [1, T={T}], got min {a.min()} and max {a.max()}")
    if not a.flags.writeable:                   # the kernels take no read-only array
        return np.array(a, dtype=np.int64)
    return np.ascontiguousarray(a, dtype=np.int64)


def seed(name, value):
    """None, or a non-negative int (NumPy's generators take no negative seed)."""
    return None if value is None else nonnegative_int(name, value)


def _physical_bytes():
    try:
        import os
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n):
    return f"{n / 2 ** 30:.3g} GiB"


def affordable(n, dtype, what):
    """Refuse, naming `what`, n elements of dtype that exceed this machine's memory."""
    need = n * np.dtype(dtype).itemsize
    have = _physical_bytes()
    if have is not None and need > have:
        raise ValueError(f"{what} would need {_gib(need)}, more than this machine's "
                         f"{_gib(have)} of memory")


def allocate(n, dtype, what):
    """np.empty(n, dtype) aligned for the kernels (see _shared.ALIGN), with an error that
    names `what` and the memory it needs."""
    affordable(n, dtype, what)
    try:
        return aligned_empty(n, dtype)
    except (MemoryError, ValueError):
        raise MemoryError(f"{what} would need {_gib(n * np.dtype(dtype).itemsize)}, which "
                          "could not be allocated") from None
