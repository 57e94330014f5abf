"""When the kernels compile, and saying so.

A Numba function with explicit signatures compiles them all when it is defined: with
every entry compiled for float32 and float64 at import, a first ``import fastlstm``
on an empty cache took about 110 s (on these 2-core machines), most of it for a dtype
and paths the run never used. So an entry (``entry``) is defined with its signatures
but compiles none; ``ensure(dtype, *entries)`` compiles, or loads from Numba's on-disk
cache, the one signature of that dtype when a call first needs it, and the entries
whose code it calls first. A compile that takes longer than a load from the cache
prints what it is doing on stderr ("compiling fastlstm's kernels for this machine —
first run only") and the time it took; ``fastlstm compile`` does all of it ahead of
time.
"""
import gc
import os
import sys
import threading
import time

import numpy as np
from numba import njit, types
from numba.core.sigutils import normalize_signature
from numba.core.typing import Signature

from ._config import JIT

__all__ = ["entry", "ensure", "entries", "ready", "signature"]

_lock = threading.RLock()
_SIGS = {}          # entry -> {dtype name: its signature}
_NEEDS = {}         # entry -> the entries its code calls
_ready = set()      # (entry, dtype name): compiled or loaded in this process


def _dtype_of(sig):
    for a in sig.args:
        t = getattr(a, "dtype", a)
        if isinstance(t, types.Float):
            return str(t)
    raise ValueError(f"signature {sig} has no float argument to name its dtype")


def _parse(text):
    args, restype = normalize_signature(text)
    return restype(*args)


def entry(sigs, needs=()):
    """Decorator: an ``@njit`` kernel with one explicit signature per float dtype (as
    numbagg's), compiled by ``ensure`` rather than when defined. `needs`: the entries
    its code calls, compiled before it (Numba types a call by the callee's compiled
    signatures; an entry compiles nothing on its own)."""
    sigs = [s if isinstance(s, Signature) else _parse(s) for s in sigs]

    def wrap(fn):
        d = njit(**JIT)(fn)
        _SIGS[d] = {_dtype_of(s): s for s in sigs}
        _NEEDS[d] = tuple(needs)
        return d
    return wrap


def entries(dtype=None):
    """Every entry defined so far (that has a signature for `dtype`, when given: the
    bfloat16 entries have float32's only)."""
    if dtype is None:
        return tuple(_SIGS)
    return tuple(d for d, sigs in _SIGS.items() if np.dtype(dtype).name in sigs)


def signature(dtype, d):
    """Entry `d`'s signature for `dtype` (compiled or not)."""
    return _SIGS[d][np.dtype(dtype).name]


def ready(dtype, d):
    """Whether entry `d` is compiled (or loaded) for `dtype` in this process."""
    return (d, np.dtype(dtype).name) in _ready


def ensure(dtype, *needed):
    """Compile, or load from the cache, each entry of `needed` for `dtype` (and what it
    calls) unless this process has it already. Cheap when it has."""
    key = dtype.name if isinstance(dtype, np.dtype) else np.dtype(dtype).name
    for d in needed:
        if (d, key) not in _ready:
            _compile(key, needed)
            return


def _order(key, needed, out):
    for d in needed:
        _order(key, _NEEDS[d], out)
        if (d, key) not in _ready and d not in out:
            out.append(d)
    return out


def _compile(key, needed):
    with _lock:
        todo = _order(key, needed, [])
        if not todo:
            return
        progress = _Progress(key, [d.py_func.__name__ for d in todo])
        try:
            for d in todo:
                sig = _SIGS[d][key]
                misses = sum(d.stats.cache_misses.values())
                if sig.args not in d.overloads:
                    # compiling is off once an entry has a signature (Numba asserts one), so
                    # that a call of a dtype no ensure() compiled fails rather than
                    # compiling unannounced
                    d.disable_compile(False)
                    # The cyclic collector walked Numba's IR graphs again and again: a
                    # sixth of a cold compile. Run less often while an entry compiles:
                    # the four entries of a float32 layer compiled in 25.6 s, peak RSS
                    # 402 MB; as by default (700), 28.6 s, 376 MB; with no collector
                    # during each compile, 25.8 s, 532 MB.
                    threshold = gc.get_threshold()
                    gc.set_threshold(50_000, *threshold[1:])
                    try:
                        d.compile(sig)
                    finally:
                        d.disable_compile(True)
                        gc.set_threshold(*threshold)
                compiled = sum(d.stats.cache_misses.values()) > misses
                if compiled:
                    gc.collect()
                _ready.add((d, key))
                progress.step(compiled)
        finally:
            progress.close()


class _Progress:
    """The line a compile shows on stderr: nothing while each entry loads from the cache
    (within DELAY seconds), else what it is doing, its steps, and the time it took.
    ``FASTLSTM_QUIET=1`` silences it."""

    DELAY = 0.5

    def __init__(self, key, names):
        self.key, self.names, self.done, self.compiled = key, names, 0, 0
        self.start = time.perf_counter()
        self.shown = False
        self.quiet = os.environ.get("FASTLSTM_QUIET", "0") not in ("", "0")
        self.tty = sys.stderr.isatty()
        self._lock = threading.Lock()
        self._timer = None
        self._arm()

    def _arm(self):
        if self.quiet or self.shown or self.done == len(self.names):
            return
        self._timer = threading.Timer(self.DELAY, self._show)
        self._timer.daemon = True
        self._timer.start()

    def _line(self):
        n = len(self.names)
        bar = "#" * (20 * self.done // n) + "-" * (20 - 20 * self.done // n)
        name = self.names[self.done] if self.done < n else ""
        return (f"fastlstm: compiling fastlstm's kernels for this machine ({self.key}) "
                f"\N{EM DASH} first run only [{bar}] {self.done}/{n} {name}")

    def _show(self):
        with self._lock:
            if self.shown or self.done == len(self.names):
                return
            self.shown = True
            sys.stderr.write(("\r" + self._line()) if self.tty else self._line() + "\n")
            sys.stderr.flush()

    def step(self, compiled):
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self.done += 1
            self.compiled += compiled
            if self.shown and self.tty:
                sys.stderr.write("\r\033[K" + self._line())
                sys.stderr.flush()
        self._arm()

    def close(self):
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self.shown:
                seconds = time.perf_counter() - self.start
                end = "\r\033[K" if self.tty else ""
                loaded = self.done - self.compiled
                sys.stderr.write(f"{end}fastlstm: compiled {self.compiled} kernel"
                                 f"{'' if self.compiled == 1 else 's'} ({self.key}) "
                                 f"in {seconds:.1f} s"
                                 + (f", loaded {loaded} from the cache" if loaded else "")
                                 + "; cached for the next run\n")
                sys.stderr.flush()
