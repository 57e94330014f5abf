"""Optimizers: one fused in-place pass over a model's flat parameter buffer.

Each follows ``torch.optim``'s definition and defaults, written in the same
order of operations so the two agree to rounding. They take any model that
exposes ``flat_params`` and ``flat_grads`` (an ``LSTM`` or a ``SequenceModel``).
"""
import math

import numpy as np

from . import _updates
from . import _validate as check
from ._shared import aligned_zeros

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "clip_grad_norm", "OPTIMIZERS", "by_name"]

#: every optimizer class by name, filled as each is defined (Optimizer.__init_subclass__):
#: checkpoints, ``fastlstm train --optimizer`` and the package's exports read it
OPTIMIZERS = {}


def clip_grad_norm(model, max_norm):
    """Scale ``model.flat_grads`` so that its L2 norm is at most ``max_norm``
    (as ``torch.nn.utils.clip_grad_norm_``). Returns the norm before clipping."""
    max_norm = check.real("max_norm", max_norm, lo=0.0, lo_open=True)
    if not hasattr(model, "flat_grads"):
        raise TypeError(f"model must expose flat_grads (an LSTM or a SequenceModel), got "
                        f"{type(model).__name__}")
    g = model.flat_grads
    total = math.sqrt(_updates.sum_squares(g))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        _updates.scale(g, g.dtype.type(coef))
    return total


class Optimizer:
    """Base: holds the model, its flat buffers and the state arrays."""

    #: names of the per-parameter state arrays, saved in checkpoints
    STATE = ()
    #: the update rule, an ``_updates`` kind
    KIND = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        OPTIMIZERS[cls.__name__] = cls

    def __init__(self, model, **hyper):
        if not (hasattr(model, "flat_params") and hasattr(model, "flat_grads")):
            raise TypeError(f"model must expose flat_params and flat_grads (an LSTM or a "
                            f"SequenceModel), got {type(model).__name__}")
        self.model = model
        self.hyper = hyper
        #: the step count as a (1,) int64 array, raised by the update kernel itself
        self.count = np.zeros(1, np.int64)
        self.state = {k: aligned_zeros(model.flat_params.size, model.flat_params.dtype)
                      for k in self.STATE}
        # the update kernel's two state arrays (SGD has one: it is passed twice)
        self.buffers = (self.state[self.STATE[0]], self.state[self.STATE[-1]])
        self._scalars = np.zeros(_updates.N_SCALARS)

    @property
    def steps(self):
        """The number of steps taken."""
        return self.count.item()

    @steps.setter
    def steps(self, n):
        self.count[0] = n

    def next_scalars(self, out):
        """Write the next step's scalars (float64, the order the update kernel reads)
        into `out`; the kernel counts the step. For the fused training step; ``step``
        uses it too."""
        raise NotImplementedError

    def step(self):
        """Update the model's parameters from its gradients."""
        self.next_scalars(self._scalars)
        _updates.update(self.KIND, self.model.flat_params, self.model.flat_grads,
                        *self.buffers, self._scalars, self.count)

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
    KIND = _updates.SGD

    def __init__(self, model, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(model, lr=check.real("lr", lr, lo=0.0), momentum=check.real(
            "momentum", momentum, lo=0.0), nesterov=bool(nesterov),
            weight_decay=check.real("weight_decay", weight_decay, lo=0.0))

    def next_scalars(self, out):
        h = self.hyper
        out[:5] = (h["lr"], h["momentum"], h["weight_decay"], h["nesterov"],
                   self.count.item() == 0)


class Adam(Optimizer):
    """Adam as torch.optim.Adam (weight decay added to the gradient)."""
    STATE = ("exp_avg", "exp_avg_sq")
    KIND = _updates.ADAM
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

    def next_scalars(self, out):
        h = self.hyper
        t = self.count.item() + 1
        b1, b2 = h["betas"]
        lr, wd = h["lr"], h["weight_decay"]
        bc1 = 1 - b1 ** t
        bc2_sqrt = math.sqrt(1 - b2 ** t)
        decay = 1 - lr * wd if self._decoupled else 1.0
        out[:8] = (lr / bc1, 1 - b1, b2, 1 - b2, h["eps"], 0.0 if self._decoupled else wd,
                  decay, bc2_sqrt)


class AdamW(Adam):
    """AdamW as torch.optim.AdamW (decoupled weight decay, default 1e-2)."""
    _decoupled = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class RMSprop(Optimizer):
    """RMSprop as torch.optim.RMSprop (not centered)."""
    STATE = ("square_avg", "momentum_buffer")
    KIND = _updates.RMSPROP

    def __init__(self, model, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
        super().__init__(model, lr=check.real("lr", lr, lo=0.0),
                         alpha=check.real("alpha", alpha, lo=0.0, hi=1.0),
                         eps=check.real("eps", eps, lo=0.0),
                         momentum=check.real("momentum", momentum, lo=0.0),
                         weight_decay=check.real("weight_decay", weight_decay, lo=0.0))

    def next_scalars(self, out):
        h = self.hyper
        out[:6] = (h["lr"], h["alpha"], 1 - h["alpha"], h["eps"], h["weight_decay"],
                   h["momentum"])


def by_name(name):
    """The optimizer class called `name`, case-insensitively ("adam", "AdamW")."""
    lower = {k.lower(): cls for k, cls in OPTIMIZERS.items()}
    try:
        return lower[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(lower))}") \
            from None
