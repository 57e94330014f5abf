"""Losses of the heads, as Numba kernels: the mean loss over the valid rows and
its gradient with respect to the head's output, in one pass, allocating nothing.

Rows are samples (head "last") or (step, sequence) pairs (head "all"); `valid`
marks the rows that count (padded steps do not). Means follow torch: MSE and
BCE average over every element of the valid rows, cross-entropy over the valid rows.
"""
import math

from numba import njit

from ._config import JIT


@njit(**JIT)
def _count(valid):
    n = 0
    for r in range(valid.shape[0]):
        n += valid[r]
    return n


@njit(**JIT)
def mse(pred, target, valid, dpred):
    n = _count(valid) * pred.shape[1]
    total = 0.0
    for r in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            if valid[r]:
                e = pred[r, k] - target[r, k]
                total += float(e) * float(e)
                dpred[r, k] = 2 * e / n
            else:
                dpred[r, k] = 0
    return total / n


@njit(**JIT)
def bce_with_logits(z, target, valid, dz):
    """Binary cross-entropy on logits, stable for any z:
    max(z, 0) - z t + log(1 + exp(-|z|))."""
    n = _count(valid) * z.shape[1]
    total = 0.0
    for r in range(z.shape[0]):
        for k in range(z.shape[1]):
            if valid[r]:
                v, t = float(z[r, k]), float(target[r, k])
                total += max(v, 0.0) - v * t + math.log1p(math.exp(-abs(v)))
                sig = 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))
                dz[r, k] = (sig - t) / n
            else:
                dz[r, k] = 0
    return total / n


@njit(**JIT)
def cross_entropy(z, labels, valid, dz):
    """Softmax cross-entropy on logits z (rows, classes) with integer labels."""
    n = _count(valid)
    total = 0.0
    for r in range(z.shape[0]):
        if not valid[r]:
            dz[r] = 0
            continue
        top = z[r, 0]
        for k in range(1, z.shape[1]):
            top = max(top, z[r, k])
        s = 0.0
        for k in range(z.shape[1]):
            s += math.exp(float(z[r, k] - top))
        lse = float(top) + math.log(s)
        total += lse - float(z[r, labels[r]])
        for k in range(z.shape[1]):
            dz[r, k] = math.exp(float(z[r, k]) - lse) / n
        dz[r, labels[r]] -= 1.0 / n
    return total / n


@njit(**JIT)
def gather_last(y, lengths, out):
    """out[b] = y[lengths[b] - 1, b] for y (T, B, F)."""
    for b in range(out.shape[0]):
        out[b] = y[lengths[b] - 1, b]


@njit(**JIT)
def scatter_last(d, lengths, dy):
    """dy (T, B, F) = 0 except dy[lengths[b] - 1, b] = d[b]."""
    dy[:] = 0
    for b in range(d.shape[0]):
        dy[lengths[b] - 1, b] = d[b]


@njit(**JIT)
def valid_steps(lengths, T, valid):
    """valid[t * B + b] = t < lengths[b]."""
    B = lengths.shape[0]
    for t in range(T):
        for b in range(B):
            valid[t * B + b] = t < lengths[b]


@njit(**JIT)
def add_bias(z, b):
    """z[r] += b for every row (NumPy's broadcast += borrows a 32 KB buffer per call)."""
    for r in range(z.shape[0]):
        for k in range(z.shape[1]):
            z[r, k] += b[k]
