"""Helpers the public classes share: reusable scratch arrays, read-only views, and
the one-thread-at-a-time guard."""
import math
import os
import tempfile
import threading

import numpy as np

__all__ = ["Buffers", "readonly", "OneThread", "aligned_empty", "aligned_zeros", "atomic_write"]

#: bytes to which every buffer the kernels stream through is aligned: one cache line,
#: one AVX-512 vector. NumPy aligns to 16 only; a workspace at 16 bytes past a line ran
#: the forward of one part of long (B=4, T=1000, I=16, H=64, float32) 1.10x slower
#: (2.83 against 2.58 ms), as every vector load then straddles two lines.
ALIGN = 64


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype) whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    raw = np.empty(n * dtype.itemsize + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + n * dtype.itemsize].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype):
    """np.zeros(shape, dtype) on an ALIGN-byte boundary."""
    a = aligned_empty(shape, dtype)
    a.fill(0)
    return a


class Buffers:
    """Named arrays sized per call and reused; a larger request grows one once. A
    repeated (name, shape) gets the same view object back: making it anew cost about
    0.4 us, and a seed-size training step asks for eight."""

    def __init__(self, dtype):
        self.dtype = dtype
        self._flat = {}
        self._views = {}

    def get(self, name, shape, dtype=None):
        key = (name, shape)
        v = self._views.get(key)
        if v is not None:
            return v
        n = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.size < n:
            buf = self._flat[name] = aligned_empty(n, dtype or self.dtype)
            # views of the buffer this one replaces must not be handed out again
            self._views = {k: a for k, a in self._views.items() if k[0] != name}
        v = self._views[key] = buf[:n].reshape(shape)
        return v


def readonly(a):
    """A read-only view of a (the caller may not write into our workspace)."""
    v = a.view()
    v.flags.writeable = False
    return v


class OneThread:
    """A model's buffers serve one thread at a time: ``with guard("forward"):``
    raises RuntimeError at once when another thread is inside a guarded call of
    the same model (instead of waiting, or tearing results). The owning thread
    may nest calls (fit -> train_step -> forward).

    The ``with`` runs on the RLock itself: its __enter__ and __exit__ are C code,
    which a KeyboardInterrupt cannot separate from the block, while a Python
    __enter__/__exit__ could be interrupted after taking the lock and leave the
    model locked for every other thread. Before that, a non-blocking probe refuses
    a call from a second thread; should two threads start within the same few
    microseconds, the later one waits for the other instead of raising."""

    def __init__(self, owner):
        self._owner = owner
        self._lock = threading.RLock()

    def __call__(self, what):
        lock = self._lock
        step = 0
        try:
            if lock.acquire(blocking=False):     # the owner's nested call succeeds too
                step = 1
                lock.release()
                return lock
        except BaseException:
            # Ctrl-C is raised only at the end of a call: at step 0, just after acquire,
            # which then succeeded if this thread owns the lock now (nested or not); at
            # step 1, after release, nothing is held
            if step == 0 and lock._is_owned():
                lock.release()
            raise
        raise RuntimeError(f"{what}() called while this {self._owner} is running in "
                           "another thread; use one model per thread (or a lock)")


def atomic_write(path, write):
    """Call write(file) on a temporary file in `path`'s folder, then rename it to
    `path`: a write that fails halfway (a full disk, Ctrl-C) leaves the previous file
    whole. The file gets the mode a plain write would give it (0666 less the umask)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".fastlstm-", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)        # mkstemp's 0600 is for the temporary name only
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
