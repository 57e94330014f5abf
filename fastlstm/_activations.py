"""The activations the kernels use: vectorisable tanh and sigmoid, and libm's on request.

Called from the cell loops of ``_cell`` (LLVM inlines them there); ``tanh_array`` and
``sigmoid_array`` apply them to an array, for tests and benchmarks.
"""
import math
import warnings

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._config import JIT
from ._numba_ext import NumbaIRAssumptionWarning

__all__ = ["tanh_array", "sigmoid_array"]

# Numba's pedantic SSA check complains about the activations once they are
# inlined (inline="always", below); the compiled code is right (the tests
# compare it with libm, the reference and torch). Scoped to these functions' names.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning,
                        message=r"variable '_(tanh|tanh_approx|sigmoid)_impl__locals__")


# --------------------------------------------------------------------------
# Activations
#
# libm's tanh/exp are scalar calls (no SVML in this llvmlite), which keeps the
# gate loop from vectorising. Instead, in float32 a fitted rational form
# x P(x^2) / Q(x^2) (_TANH_P, _TANH_Q), and in float64, whose accuracy that
# form's degree would not reach:
#   tanh(x) = e / (e + 2) with e = expm1(2|x|), sign restored,
#   expm1(2a) computed as expm1(u) by its Taylor series at u = 2a / 2^k, then
#   k doublings expm1(2u) = expm1(u) * (expm1(u) + 2).
# Only + * / and a compare: LLVM vectorises it. The doublings do not amplify
# the relative error for small arguments, and for large ones the error in e is
# divided by (e + 2) in the quotient. |x| is clamped where tanh rounds to 1.
# sigmoid(x) = 0.5 + 0.5 tanh(x / 2): exact to an absolute ulp of 0.5.
# tests/test_activations.py measures the error over the whole real line.
# --------------------------------------------------------------------------

def _ftype(bitwidth):
    return np.float32 if bitwidth == 32 else np.float64


def _tanh_approx(x):  # pragma: no cover - Python stand-in; Numba compiles the overload
    return math.tanh(x)


def _tanh(x, exact):  # pragma: no cover - Python stand-in
    return math.tanh(x)


def _sigmoid(x, exact):  # pragma: no cover - Python stand-in
    return 0.5 * (1.0 + math.tanh(0.5 * x))


def _expm1_series(u):  # pragma: no cover - Python stand-in; Numba compiles the overload
    return math.expm1(u)


@overload(_expm1_series, inline="always", jit_options=JIT)
def _expm1_series_impl(u):
    """expm1(u) for |u| <= 0.16, float64, by its Taylor series u (1 + u (1/2! + u (1/3!
    + ...))) in Horner's form to u^11/11! (the tail u^12/12! ~ 4e-19 is below its ulp),
    one multiply-add per term (the nested form u (1 + u/2 (1 + u/3 (...))) took two: a
    fifth of tanh's work). Written out: a loop over a tuple of constants kept LLVM from
    vectorising it."""
    if not isinstance(u, types.Float) or u.bitwidth != 64:
        return None
    ONE = np.float64(1.0)
    F2, F3, F4, F5, F6, F7, F8, F9, F10, F11 = (np.float64(1.0 / math.factorial(n))
                                                for n in range(2, 12))

    def impl(u):
        p = F11 * u + F10
        p = p * u + F9
        p = p * u + F8
        p = p * u + F7
        p = p * u + F6
        p = p * u + F5
        p = p * u + F4
        p = p * u + F3
        p = p * u + F2
        p = p * u + ONE
        return u * p
    return impl


#: float32 tanh(x) = x P(x^2) / Q(x^2) on |x| <= 9 (past it tanh rounds to +-1): P of
#: degree 6, Q of degree 3, both 1 at 0, fitted here to tanh's relative error on [0, 9]
#: (least squares, reweighted towards the worst points; 7e-9 in float64, 2.3 eps in
#: float32 with fused multiply-adds). Against the series below, 12 operations and a
#: division instead of 27 and a division (0.50 -> 0.38 ns a value).
_TANH_P = (1.0, 1.3085770448387002e-01, 3.1058857644251695e-03, 1.1173490202796571e-05,
           -2.0297138149688421e-08, 5.3094679544722222e-11, -8.5620981630110283e-14)
_TANH_Q = (1.0, 4.6419099620879695e-01, 2.4502962863684242e-02, 2.5488958862831412e-04)


def _tanh_rational():
    f = np.float32
    P0, P1, P2, P3, P4, P5, P6 = (f(c) for c in _TANH_P)
    Q0, Q1, Q2, Q3 = (f(c) for c in _TANH_Q)
    CLAMP, ONE = f(9.0), f(1.0)

    def impl(x):
        a = CLAMP if x > CLAMP else x           # NaN compares False and stays NaN
        a = -CLAMP if a < -CLAMP else a
        s = a * a
        p = ((((((P6 * s + P5) * s + P4) * s + P3) * s + P2) * s + P1) * s + P0)
        q = ((Q3 * s + Q2) * s + Q1) * s + Q0
        t = a * p / q
        # +-1 past the clamp, and where the fit overshoots 1 by an ulp (near 9)
        t = ONE if t > ONE or x >= CLAMP else t
        return -ONE if t < -ONE or x <= -CLAMP else t
    return impl


@overload(_tanh_approx, inline="always", jit_options=JIT)
def _tanh_approx_impl(x):
    if not isinstance(x, types.Float):
        return None
    if x.bitwidth == 32:
        return _tanh_rational()
    # past CLAMP tanh rounds to +-1; below TINY it rounds to x, and returning x there
    # also keeps the scaling by 2^-8 from shifting subnormal inputs' bits away
    CLAMP, TINY, TWO = np.float64(20.0), np.float64(1e-8), np.float64(2.0)
    SCALE = np.float64(2.0 / 256.0)     # u = 2|x| / 2^8, so |u| <= 0.16

    def impl(x):
        a = abs(x)
        u = (CLAMP if a > CLAMP else a) * SCALE    # NaN compares False and stays NaN
        e = _expm1_series(u)
        # Eight doublings expm1(2u) = expm1(u) (expm1(u) + 2), written out:
        # a loop here trips Numba's SSA check when the function is inlined.
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        e = e * (e + TWO)
        t = e / (e + TWO)
        return x if a < TINY else (t if x >= 0 else -t)
    return impl


# _tanh and _sigmoid are compiled once per float type and called, not inlined by Numba:
# LLVM inlines the call where `exact` is a constant (see below), the untaken branch
# disappears and the loop vectorises (seed..medium fwd+bwd as fast as with Numba's
# inlining), while Numba types and lowers each once instead of once per call site;
# with Numba's inline="always" here, layer_forward compiled in 19 s instead of 9 s.

@overload(_tanh, jit_options=JIT)
def _tanh_impl(x, exact):
    if not isinstance(x, types.Float):
        return None

    def impl(x, exact):
        return math.tanh(x) if exact else _tanh_approx(x)
    return impl


@overload(_sigmoid, jit_options=JIT)
def _sigmoid_impl(x, exact):
    if not isinstance(x, types.Float):
        return None
    ftype = _ftype(x.bitwidth)
    HALF, ONE = ftype(0.5), ftype(1.0)

    def impl(x, exact):
        if exact:
            return ONE / (ONE + math.exp(-x))
        return HALF + HALF * _tanh_approx(HALF * x)
    return impl


# `exact` reaches the loops below as a literal True or False: each loop body is
# an inline="always" function, inlined by Numba into one copy per branch, so LLVM
# sees a constant and deletes the libm path from the fast loop. A runtime flag
# inside the loop kept LLVM from vectorising it (the loop was too large to unswitch).

@njit(inline="always", **JIT)
def _map_tanh(x, out, exact):
    for k in range(x.shape[0]):
        out[k] = _tanh(x[k], exact)


@njit(inline="always", **JIT)
def _map_sigmoid(x, out, exact):
    for k in range(x.shape[0]):
        out[k] = _sigmoid(x[k], exact)


@njit(**JIT)
def tanh_array(x, out, exact):
    """out[:] = tanh(x) with the kernels' activation (for tests and benchmarks)."""
    if exact:
        _map_tanh(x, out, True)
    else:
        _map_tanh(x, out, False)


@njit(**JIT)
def sigmoid_array(x, out, exact):
    """out[:] = sigmoid(x) with the kernels' activation."""
    if exact:
        _map_sigmoid(x, out, True)
    else:
        _map_sigmoid(x, out, False)
