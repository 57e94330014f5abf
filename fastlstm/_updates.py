"""Numba kernels of the optimizers: one fused in-place pass over a flat parameter
buffer, and the gradient norm's clipping. ``fastlstm.optim`` is their public
face; the fused training step (``_step``) calls them too.

Each follows ``torch.optim``'s definition, in the same order of operations, so
the two agree to rounding. The scalars arrive as a float64 array, computed in
Python's double as torch computes them (1 - beta, lr / bias correction, ...),
and are rounded here to the buffers' dtype, as torch rounds them.
"""
import math

from numba import njit

from ._config import JIT

__all__ = ["SGD", "ADAM", "RMSPROP", "N_SCALARS", "update", "sum_squares", "scale"]

#: update(kind, ...): which rule; the layout of `s` for each is in its kernel
SGD, ADAM, RMSPROP = 0, 1, 2
#: the length of `s`: the most scalars any rule reads
N_SCALARS = 8


@njit(inline="always", **JIT)
def _sgd(p, g, buf, s):
    """s: lr, momentum, weight_decay, nesterov (0/1), first step (0/1)."""
    ft = p.dtype.type
    lr, momentum, weight_decay = ft(s[0]), ft(s[1]), ft(s[2])
    nesterov, first = s[3] != 0, s[4] != 0
    for k in range(p.size):
        d = g[k] + weight_decay * p[k] if weight_decay != 0 else g[k]
        if momentum != 0:
            buf[k] = d if first else momentum * buf[k] + d
            d = d + momentum * buf[k] if nesterov else buf[k]
        p[k] -= lr * d


@njit(inline="always", **JIT)
def _adam(p, g, m, v, s):
    """s: lr / bias correction 1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay (0 for
    AdamW), decay (1 - lr * weight_decay for AdamW, else 1), sqrt(bias correction 2)."""
    ft = p.dtype.type
    step_size, one_m_beta1, beta2, one_m_beta2 = ft(s[0]), ft(s[1]), ft(s[2]), ft(s[3])
    eps, weight_decay, decay, bc2_sqrt = ft(s[4]), ft(s[5]), ft(s[6]), ft(s[7])
    for k in range(p.size):
        d = g[k] + weight_decay * p[k] if weight_decay != 0 else g[k]
        if decay != 1:
            p[k] *= decay
        m[k] += one_m_beta1 * (d - m[k])                 # torch's lerp
        v[k] = beta2 * v[k] + one_m_beta2 * d * d
        p[k] -= step_size * m[k] / (math.sqrt(v[k]) / bc2_sqrt + eps)


@njit(inline="always", **JIT)
def _rmsprop(p, g, sq, buf, s):
    """s: lr, alpha, 1 - alpha, eps, weight_decay, momentum."""
    ft = p.dtype.type
    lr, alpha, one_m_alpha, eps = ft(s[0]), ft(s[1]), ft(s[2]), ft(s[3])
    weight_decay, momentum = ft(s[4]), ft(s[5])
    for k in range(p.size):
        d = g[k] + weight_decay * p[k] if weight_decay != 0 else g[k]
        sq[k] = alpha * sq[k] + one_m_alpha * d * d
        avg = math.sqrt(sq[k]) + eps
        if momentum > 0:
            buf[k] = momentum * buf[k] + d / avg
            p[k] -= lr * buf[k]
        else:
            p[k] -= lr * d / avg


@njit(**JIT)
def update(kind, p, g, s1, s2, s, count):
    """One step of rule `kind` on parameters p with gradients g; s1, s2 its state
    arrays (SGD: s1 the momentum buffer; Adam: exp_avg, exp_avg_sq; RMSprop:
    square_avg, momentum_buffer), s its scalars. count[0], the optimizer's step
    count, is raised here, in the same compiled call as the update: Python counting
    before or after it could be interrupted (Ctrl-C) between the two."""
    if kind == SGD:
        _sgd(p, g, s1, s)
    elif kind == ADAM:
        _adam(p, g, s1, s2, s)
    else:
        _rmsprop(p, g, s1, s2, s)
    count[0] += 1


@njit(**JIT)
def sum_squares(g):
    acc = 0.0                     # float64 accumulator, as torch's norm of float32
    for k in range(g.size):
        acc += float(g[k]) * float(g[k])
    return acc


@njit(**JIT)
def scale(g, s):
    for k in range(g.size):
        g[k] *= s
