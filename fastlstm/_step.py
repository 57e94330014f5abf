"""A SequenceModel's training step as one Numba entry: the LSTM layer's forward,
the head on each sequence's last step, the loss, the backward, the gradient
clipping and the optimizer's update.

At seed size a step made of separate calls spent most of its time in Python
between them (42 us a step, of which the kernels were about 6). SequenceModel
takes this path when its LSTM has a plan for x's shape (one layer, one
direction, one part of the batch, no state or lengths: see _plans.Plan) and its
head is "last"; the general path runs the same kernels one by one.
"""
import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from . import _kernels, _losses, _updates
from ._config import JIT, follow
from ._kernels import layer_backward, layer_forward, workspace_of

# this file's cached kernel carries the code of the entries, the losses and the updates
follow(__file__, *_kernels.SOURCES, _losses.__file__, _updates.__file__)

__all__ = ["LOSSES", "INTS", "HYPER", "N_SCALARS", "train_step"]

#: the losses, by SequenceModel's name: the kernel's code for each (ints[LOSS])
MSE, BCE, CE = 0, 1, 2
LOSSES = {"mse": MSE, "bce": BCE, "ce": CE}

#: train_step's two small arrays, slot by slot (the kernel reads the slots' indices as
#: constants): ints (int64) holds the layer call's sizes and option bits, the layer's
#: parameter count n, the head's outputs O, the loss and the optimizer's rule
INTS = ("T", "B", "I", "H", "P", "opts", "n", "O", "loss", "rule")
_T, _B, _I, _H, _P, _OPTS, _N, _O, LOSS, RULE = range(len(INTS))
#: hyper (float64) holds the optimizer's scalars (_updates.N_SCALARS), the cell clip and
#: the norm to clip the gradient to (0: none)
HYPER = tuple(f"optimizer {k}" for k in range(_updates.N_SCALARS)) + ("clip", "max_norm")
CLIP, MAX_NORM = _updates.N_SCALARS, _updates.N_SCALARS + 1
N_SCALARS = len(HYPER)


def _loss(kind, logits, y, valid, dlogits):  # pragma: no cover - compiled by the overload
    raise NotImplementedError


@overload(_loss, jit_options=JIT)
def _loss_impl(kind, logits, y, valid, dlogits):
    # by y's type: Numba types every branch, and integer labels index the logits
    if isinstance(y.dtype, types.Integer):
        def impl(kind, logits, y, valid, dlogits):
            return _losses.cross_entropy(logits, y, valid, dlogits)
    else:
        def impl(kind, logits, y, valid, dlogits):
            if kind == MSE:
                return _losses.mse(logits, y, valid, dlogits)
            return _losses.bce_with_logits(logits, y, valid, dlogits)
    return impl


@njit(**JIT)
def train_step(p, g, ws, lengths, y, valid, scratch, s1, s2, hyper, ints, count):
    """One step; returns the loss. A loss that is not finite leaves the parameters,
    the optimizer's state and its step count (count[0]) as they were.

    p, g: the model's flat parameters and gradients, the layer's first (n of them),
    then the head's W (O, P) and b (O,). ws, lengths: the layer's workspace and
    its (B,) lengths. y: targets (B, O), or (B,) int64 labels for CE; valid (B,)
    uint8 ones. scratch: 2 B (P + O) elements. s1, s2: the optimizer's state
    arrays. hyper (float64) and ints (int64): their slots are named by HYPER and INTS.
    """
    T, B, I, H, P, opts = ints[_T], ints[_B], ints[_I], ints[_H], ints[_P], ints[_OPTS]
    n, O, loss_kind, rule = ints[_N], ints[_O], ints[LOSS], ints[RULE]
    clip, max_norm = p.dtype.type(hyper[CLIP]), hyper[MAX_NORM]
    g[:] = 0
    layer_forward(p[:n], ws, lengths, clip, T, B, I, H, P, opts)
    v = workspace_of(ws, T, B, I, H, P, opts)
    feats = scratch[:B * P].reshape((B, P))
    dfeats = scratch[B * P:2 * B * P].reshape((B, P))
    logits = scratch[2 * B * P:2 * B * P + B * O].reshape((B, O))
    dlogits = scratch[2 * B * P + B * O:2 * B * (P + O)].reshape((B, O))
    W, b = p[n:n + O * P].reshape((O, P)), p[n + O * P:n + O * P + O]
    dW, db = g[n:n + O * P].reshape((O, P)), g[n + O * P:n + O * P + O]

    for r in range(B):                        # h[t + 1] is step t's output
        feats[r] = v.h[lengths[r], r]
    np.dot(feats, W.T, out=logits)
    for r in range(B):
        for k in range(O):
            logits[r, k] += b[k]
    loss = _loss(loss_kind, logits, y, valid, dlogits)

    np.dot(dlogits.T, feats, out=dW)          # g is zero: the products land in place
    for r in range(B):
        for k in range(O):
            db[k] += dlogits[r, k]
    np.dot(dlogits, W, out=dfeats)
    v.dy[:] = 0
    for r in range(B):
        v.dy[lengths[r] - 1, r] = dfeats[r]
    # the input's gradient is no one's: its product skipped
    layer_backward(p[:n], g[:n], ws, lengths, clip, T, B, I, H, P, opts | _kernels.NO_DX)

    if not math.isfinite(loss):
        return loss
    if max_norm > 0:                          # as optim.clip_grad_norm
        coef = max_norm / (math.sqrt(_updates.sum_squares(g)) + 1e-6)
        if coef < 1.0:
            _updates.scale(g, g.dtype.type(coef))
    _updates.update(rule, p, g, s1, s2, hyper, count)
    return loss
