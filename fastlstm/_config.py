"""Numba compilation flags, in one place for every kernel.

``FASTLSTM_EXACT_ACTIVATIONS=1`` in the environment makes the kernels use
libm's ``tanh``/``exp`` instead of the vectorised approximations (for
debugging an accuracy question). It is read when a model is built and passed to
the kernels as an argument, so the on-disk compilation cache stays valid.
"""
import hashlib
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


def _cache_folder(path):
    """The folder Numba caches the functions of source file `path` in (the first of its
    locators that takes the file, as Numba picks one), or None."""
    from ._numba_ext import cache_locators
    for cls in cache_locators():
        locator = cls.from_function(follow, path)
        if locator is not None:
            return locator.get_cache_path()
    return None


def follow(path, *deps):
    """Numba keys a cached function by its own source file only (in Numba 0.68 by a
    hash of its contents; older releases by its timestamp), but a kernel that calls or
    inlines kernels of other files carries their code in its cache entry. So the
    cache entries of `path`'s functions are deleted when the contents of `deps`
    changed since they were written (a stamp file beside them holds the deps' hash),
    and Numba compiles them again. Call it at import, before compiling."""
    try:
        digest = hashlib.sha256()
        for d in deps:
            with open(d, "rb") as f:
                digest.update(f.read())
        folder = _cache_folder(path)
        if folder is None or not os.path.isdir(folder):
            return
        module = os.path.splitext(os.path.basename(path))[0]
        stamp = os.path.join(folder, module + ".deps")
        try:
            with open(stamp) as f:
                if f.read() == digest.hexdigest():
                    return
        except OSError:
            pass
        for name in os.listdir(folder):
            if name.startswith(module + ".") and name.endswith((".nbi", ".nbc")):
                os.remove(os.path.join(folder, name))
        # written whole, then renamed: a process starting meanwhile (two ranks of a job
        # on a cold cache) reads the old stamp or the new one, never half of one, so it
        # does not delete the entries the other is writing
        tmp = f"{stamp}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(digest.hexdigest())
        os.replace(tmp, stamp)
    except OSError:          # a read-only cache folder: Numba does not write there either
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
