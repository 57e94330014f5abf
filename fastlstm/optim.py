"""Optimizers: one fused in-place pass over a model's flat parameter buffer.

Each follows ``torch.optim``'s definition and defaults, written in the same
order of operations so the two agree to rounding. They take any model that
exposes ``flat_params`` and ``flat_grads`` (an ``LSTM`` or a ``SequenceModel``).
"""
import math

import numpy as np
from numba import njit

from . import _validate as check
from ._config import JIT

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "clip_grad_norm"]


# -- kernels ---------------------------------------------------------------------
# Scalars arrive already in the buffers' dtype, and composite ones (1 - beta,
# lr / bias correction, 1 - lr * weight_decay) computed in Python's double first,
# as torch computes them, so float32 rounding matches torch's.

@njit(**JIT)
def _sgd(p, g, buf, lr, momentum, weight_decay, nesterov, first):
    for k in range(p.size):
        d = g[k] + weight_decay * p[k] if weight_decay != 0 else g[k]
        if momentum != 0:
            buf[k] = d if first else momentum * buf[k] + d
            d = d + momentum * buf[k] if nesterov else buf[k]
        p[k] -= lr * d


@njit(**JIT)
def _adam(p, g, m, v, step_size, one_m_beta1, beta2, one_m_beta2, eps, weight_decay, decay,
          bc2_sqrt):
    """decay = 1 - lr * weight_decay for AdamW (else 1, and weight_decay joins the
    gradient as in Adam)."""
    for k in range(p.size):
        d = g[k] + weight_decay * p[k] if weight_decay != 0 else g[k]
        if decay != 1:
            p[k] *= decay
        m[k] += one_m_beta1 * (d - m[k])                 # torch's lerp
        v[k] = beta2 * v[k] + one_m_beta2 * d * d
        p[k] -= step_size * m[k] / (math.sqrt(v[k]) / bc2_sqrt + eps)


@njit(**JIT)
def _rmsprop(p, g, sq, buf, lr, alpha, one_m_alpha, eps, weight_decay, momentum):
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
def _sum_squares(g):
    acc = 0.0                     # float64 accumulator, as torch's norm of float32
    for k in range(g.size):
        acc += float(g[k]) * float(g[k])
    return acc


@njit(**JIT)
def _scale(g, s):
    for k in range(g.size):
        g[k] *= s


def clip_grad_norm(model, max_norm):
    """Scale ``model.flat_grads`` so that its L2 norm is at most ``max_norm``
    (as ``torch.nn.utils.clip_grad_norm_``). Returns the norm before clipping."""
    max_norm = check.real("max_norm", max_norm, lo=0.0, lo_open=True)
    if not hasattr(model, "flat_grads"):
        raise TypeError(f"model must expose flat_grads (an LSTM or a SequenceModel), got "
                        f"{type(model).__name__}")
    g = model.flat_grads
    total = math.sqrt(_sum_squares(g))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        _scale(g, g.dtype.type(coef))
    return total


class Optimizer:
    """Base: holds the model, its flat buffers and the state arrays."""

    #: names of the per-parameter state arrays, saved in checkpoints
    STATE = ()

    def __init__(self, model, **hyper):
        if not (hasattr(model, "flat_params") and hasattr(model, "flat_grads")):
            raise TypeError(f"model must expose flat_params and flat_grads (an LSTM or a "
                            f"SequenceModel), got {type(model).__name__}")
        self.model = model
        self.hyper = hyper
        self.steps = 0
        self.state = {k: np.zeros_like(model.flat_params) for k in self.STATE}

    def _t(self, value):
        return self.model.flat_params.dtype.type(value)

    def zero_grad(self):
        self.model.flat_grads.fill(0)

    def state_dict(self):
        """Hyper-parameters, step count and state arrays (copies)."""
        return dict(type=type(self).__name__, hyper=dict(self.hyper), steps=self.steps,
                    state={k: v.copy() for k, v in self.state.items()})

    def load_state_dict(self, d):
        """Restore what ``state_dict`` returned; every shape is checked first."""
        if d.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {d.get('type')}, not {type(self).__name__}")
        for k in self.STATE:
            if k not in d["state"]:
                raise KeyError(f"optimizer state is missing {k!r}")
            check.shape(f"optimizer state {k!r}", d["state"][k], self.state[k].shape)
        self.hyper = dict(d["hyper"])
        self.steps = int(d["steps"])
        for k in self.STATE:
            np.copyto(self.state[k], d["state"][k], casting="same_kind")

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hyper.items())})"


class SGD(Optimizer):
    """Stochastic gradient descent, with momentum and Nesterov as torch.optim.SGD
    (dampening 0)."""
    STATE = ("momentum_buffer",)

    def __init__(self, model, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(model, lr=check.real("lr", lr, lo=0.0), momentum=check.real(
            "momentum", momentum, lo=0.0), nesterov=bool(nesterov),
            weight_decay=check.real("weight_decay", weight_decay, lo=0.0))

    def step(self):
        h, t = self.hyper, self._t
        _sgd(self.model.flat_params, self.model.flat_grads, self.state["momentum_buffer"],
             t(h["lr"]), t(h["momentum"]), t(h["weight_decay"]), h["nesterov"],
             self.steps == 0)
        self.steps += 1


class Adam(Optimizer):
    """Adam as torch.optim.Adam (weight decay added to the gradient)."""
    STATE = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = betas
        super().__init__(model, lr=check.real("lr", lr, lo=0.0),
                         betas=(check.real("betas[0]", b1, lo=0.0, hi=1.0, hi_open=True),
                                check.real("betas[1]", b2, lo=0.0, hi=1.0, hi_open=True)),
                         eps=check.real("eps", eps, lo=0.0),
                         weight_decay=check.real("weight_decay", weight_decay, lo=0.0))

    def step(self):
        h, t = self.hyper, self._t
        self.steps += 1
        b1, b2 = h["betas"]
        lr, wd = h["lr"], h["weight_decay"]
        bc1 = 1 - b1 ** self.steps
        bc2_sqrt = math.sqrt(1 - b2 ** self.steps)
        decay = 1 - lr * wd if self._decoupled else 1.0
        _adam(self.model.flat_params, self.model.flat_grads, self.state["exp_avg"],
              self.state["exp_avg_sq"], t(lr / bc1), t(1 - b1), t(b2), t(1 - b2), t(h["eps"]),
              t(0.0 if self._decoupled else wd), t(decay), t(bc2_sqrt))


class AdamW(Adam):
    """AdamW as torch.optim.AdamW (decoupled weight decay, default 1e-2)."""
    _decoupled = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class RMSprop(Optimizer):
    """RMSprop as torch.optim.RMSprop (not centered)."""
    STATE = ("square_avg", "momentum_buffer")

    def __init__(self, model, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
        super().__init__(model, lr=check.real("lr", lr, lo=0.0),
                         alpha=check.real("alpha", alpha, lo=0.0, hi=1.0),
                         eps=check.real("eps", eps, lo=0.0),
                         momentum=check.real("momentum", momentum, lo=0.0),
                         weight_decay=check.real("weight_decay", weight_decay, lo=0.0))

    def step(self):
        h, t = self.hyper, self._t
        _rmsprop(self.model.flat_params, self.model.flat_grads, self.state["square_avg"],
                 self.state["momentum_buffer"], t(h["lr"]), t(h["alpha"]), t(1 - h["alpha"]),
                 t(h["eps"]),
                 t(h["weight_decay"]), t(h["momentum"]))
        self.steps += 1
