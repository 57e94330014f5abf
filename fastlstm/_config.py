"""Numba compilation flags, in one place for every kernel.

``FASTLSTM_EXACT_ACTIVATIONS=1`` in the environment makes the kernels use
libm's ``tanh``/``exp`` instead of the vectorised approximations (for
debugging an accuracy question). It is read when a model is built and passed to
the kernels as an argument, so the on-disk compilation cache stays valid.
"""
import os
import tempfile
import warnings

# error_model="numpy": Python's error model adds a zero-division check to every
# division, which keeps LLVM from vectorising the gate loops.
# fastmath without "nnan"/"ninf": NaN and inf must keep propagating (a NaN in the
# input reaches the outputs), so LLVM may not assume they never occur.
JIT = dict(
    nogil=True,
    cache=True,
    error_model="numpy",
    fastmath={"nsz", "arcp", "contract", "afn", "reassoc"},
)


def follow(path, *deps):
    """Numba's on-disk cache checks only the timestamp of a cached function's own
    file, but a kernel that calls (or inlines) kernels of other files carries
    their code in its cache entry. Touch `path` when one of `deps` (files) is
    newer, so that its cache is rebuilt. Call it at import, before compiling."""
    try:
        if max(os.stat(d).st_mtime for d in deps) > os.stat(path).st_mtime:
            os.utime(path)
    except OSError:          # an installed, read-only package: its files do not change
        pass


def exact_activations():
    """True when the environment asks for libm activations instead of the fast ones."""
    return os.environ.get("FASTLSTM_EXACT_ACTIVATIONS", "0") not in ("", "0")


def _writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except OSError:
        return False


def _check_cache():
    """Numba writes compiled kernels beside the package (or to NUMBA_CACHE_DIR).
    When that is impossible, say so once and compile in memory instead: every
    process then pays the compile time (tens of seconds) but works."""
    target = os.environ.get("NUMBA_CACHE_DIR")
    if target and not _writable(target):
        JIT["cache"] = False
        warnings.warn(f"fastlstm: the Numba cache directory NUMBA_CACHE_DIR={target!r} is not "
                      "writable; kernels are compiled in every process instead of cached",
                      RuntimeWarning, stacklevel=3)
    elif not target and not _writable(os.path.join(os.path.dirname(__file__), "__pycache__")):
        warnings.warn("fastlstm: the package folder is not writable; Numba caches the kernels "
                      "in its per-user cache folder instead (set NUMBA_CACHE_DIR to choose one)",
                      RuntimeWarning, stacklevel=3)


_check_cache()
