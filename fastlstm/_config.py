"""Numba compilation flags, in one place for every kernel.

``FASTLSTM_EXACT_ACTIVATIONS=1`` in the environment makes the kernels use
libm's ``tanh``/``exp`` instead of the vectorised approximations (for
debugging an accuracy question). It is read when a model is built and passed to
the kernels as an argument, so the on-disk compilation cache stays valid.
"""
import os

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


def exact_activations():
    """True when the environment asks for libm activations instead of the fast ones."""
    return os.environ.get("FASTLSTM_EXACT_ACTIVATIONS", "0") not in ("", "0")
