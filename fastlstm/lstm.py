"""The public LSTM layer: validates, owns the buffers, calls the kernels."""
import math

import numpy as np

from . import _validate as check
from ._config import exact_activations
from ._kernels import lstm_backward, lstm_forward

__all__ = ["LSTM"]


def _readonly(a):
    v = a.view()
    v.flags.writeable = False
    return v


class _Workspace:
    """Activation and gradient buffers for up to (T, B) = capacity.

    Each buffer is flat and handed out as a C-contiguous view of the first
    T*B*... elements, so a smaller call reuses a larger buffer without copying
    and the kernels always see contiguous arrays.
    """

    def __init__(self, T, B, I, H, dtype):
        self.T, self.B, self.I, self.H = T, B, I, H
        shapes = self._shapes(T, B)
        self._flat = {k: np.empty(math.prod(s), dtype) for k, s in shapes.items()}

    def _shapes(self, T, B):
        I, H = self.I, self.H
        return dict(
            x=(T, B, I), gates=(T, B, 4 * H), h=(T + 1, B, H), c=(T + 1, B, H),
            tanh_c=(T, B, H), rec=(B, 4 * H),
            dy=(T, B, H), dgates=(T, B, 4 * H), dx=(T, B, I), dh=(B, H), dc=(B, H),
        )

    def fits(self, T, B):
        return T <= self.T and B <= self.B

    def views(self, T, B):
        return {k: self._flat[k][:math.prod(s)].reshape(s) for k, s in self._shapes(T, B).items()}


class LSTM:
    """A single-layer, single-direction LSTM with torch.nn.LSTM's parameters.

    Gate order (i, f, g, o), parameter names and shapes follow ``torch.nn.LSTM``,
    so ``{k: v.numpy() for k, v in torch_lstm.state_dict().items()}`` loads as it
    is. All parameters live in one flat buffer ``flat_params`` and all gradients in
    ``flat_grads``; ``params`` and ``grads`` map torch's names to views into them.

    Parameters
    ----------
    input_size, hidden_size : int
    dtype : float32 or float64
        The dtype of the parameters and of every computation. Floating inputs of
        another dtype are cast to it; non-floating inputs are refused.
    seed : int or None
        Seeds the initialisation U(-1/sqrt(H), 1/sqrt(H)), as torch's.

    Notes
    -----
    Buffers are sized on the first call for its (T, B) and reused; a larger T or
    B grows them once. The arrays ``forward`` and ``backward`` return are
    read-only views into these buffers, valid until the next call: copy them to
    keep them.
    """

    def __init__(self, input_size, hidden_size, dtype=np.float32, seed=None):
        self.input_size = check.positive_int("input_size", input_size)
        self.hidden_size = check.positive_int("hidden_size", hidden_size)
        self.dtype = check.dtype("dtype", dtype)
        I, H = self.input_size, self.hidden_size
        self._layout = [("weight_ih_l0", (4 * H, I)), ("weight_hh_l0", (4 * H, H)),
                        ("bias_ih_l0", (4 * H,)), ("bias_hh_l0", (4 * H,))]
        n = sum(math.prod(s) for _, s in self._layout)
        self.flat_params = np.empty(n, self.dtype)
        self.flat_grads = np.zeros(n, self.dtype)
        self.params, self.grads = {}, {}
        offset = 0
        for name, shape in self._layout:
            size = math.prod(shape)
            self.params[name] = self.flat_params[offset:offset + size].reshape(shape)
            self.grads[name] = self.flat_grads[offset:offset + size].reshape(shape)
            offset += size
        bound = 1.0 / math.sqrt(H)
        self.flat_params[:] = np.random.default_rng(seed).uniform(-bound, bound, n)
        self._exact = exact_activations()
        self._ws = None
        self._last = None   # (T, B) of the forward that backward will differentiate
        self._tmp_ih = np.empty((4 * H, I), self.dtype)
        self._tmp_hh = np.empty((4 * H, H), self.dtype)

    def __repr__(self):
        return (f"LSTM(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"dtype={self.dtype.name})")

    # -- buffers -----------------------------------------------------------

    def _views(self, T, B):
        if self._ws is None or not self._ws.fits(T, B):
            old = self._ws
            T_cap = T if old is None else max(T, old.T)
            B_cap = B if old is None else max(B, old.B)
            self._ws = _Workspace(T_cap, B_cap, self.input_size, self.hidden_size, self.dtype)
        return self._ws.views(T, B)

    def _state(self, name, state, B):
        """Validated (h, c) of shape (1, B, H) each, or (None, None)."""
        if state is None:
            return None, None
        h, c = check.pair(name, state)
        for part, a in ((f"{name}[0] (h)", h), (f"{name}[1] (c)", c)):
            check.float_array(part, a, self.dtype)
            check.shape(part, a, (1, B, self.hidden_size))
        return h, c

    # -- forward / backward ------------------------------------------------

    def forward(self, x, state=None):
        """Run over a whole sequence.

        Parameters
        ----------
        x : ndarray (T, B, input_size)
        state : (h0, c0), each (1, B, hidden_size), optional
            Zeros when omitted.

        Returns
        -------
        y : ndarray (T, B, hidden_size)
        (h_n, c_n) : ndarrays (1, B, hidden_size)
            Read-only views into the workspace, valid until the next call.
        """
        check.float_array("x", x, self.dtype)
        check.shape("x", x, ("T", "B", self.input_size))
        T, B = x.shape[:2]
        if T < 1 or B < 1:
            raise ValueError(f"x must have T >= 1 and B >= 1, got shape {x.shape}")
        h0, c0 = self._state("state", state, B)

        v = self._views(T, B)
        np.copyto(v["x"], x, casting="same_kind")
        for buf, init in ((v["h"][0], h0), (v["c"][0], c0)):
            if init is None:
                buf.fill(0)
            else:
                np.copyto(buf, init[0], casting="same_kind")
        p = self.params
        lstm_forward(v["x"], p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                     p["bias_hh_l0"], v["gates"], v["h"], v["c"], v["tanh_c"], v["rec"],
                     self._exact)
        self._last = (T, B)
        return _readonly(v["h"][1:]), (_readonly(v["h"][T:]), _readonly(v["c"][T:]))

    def backward(self, dy, dstate=None):
        """Backpropagate through the last ``forward``; add into ``grads``.

        Parameters
        ----------
        dy : ndarray (T, B, hidden_size)
            Gradient of the loss with respect to ``y``.
        dstate : (dh_n, dc_n), each (1, B, hidden_size), optional
            Gradient with respect to the final state; zeros when omitted.

        Returns
        -------
        dx : ndarray (T, B, input_size)
        (dh0, dc0) : ndarrays (1, B, hidden_size)
            Read-only views into the workspace, valid until the next call.
        """
        if self._last is None:
            raise RuntimeError("backward() needs a forward() first: there are no "
                               "activations to differentiate")
        T, B = self._last
        check.float_array("dy", dy, self.dtype)
        check.shape("dy", dy, (T, B, self.hidden_size))
        dh_n, dc_n = self._state("dstate", dstate, B)

        v = self._views(T, B)
        # Always copied: the kernel needs a contiguous, writeable array of the
        # model's dtype, and the copy is small beside the rest of the pass.
        np.copyto(v["dy"], dy, casting="same_kind")
        for buf, init in ((v["dh"], dh_n), (v["dc"], dc_n)):
            if init is None:
                buf.fill(0)
            else:
                np.copyto(buf, init[0], casting="same_kind")
        p, g = self.params, self.grads
        lstm_backward(v["dy"], v["dh"], v["dc"], v["x"], p["weight_ih_l0"], p["weight_hh_l0"],
                      v["gates"], v["h"], v["c"], v["tanh_c"], v["dgates"], v["dx"],
                      g["weight_ih_l0"], g["weight_hh_l0"], g["bias_ih_l0"], g["bias_hh_l0"],
                      self._tmp_ih, self._tmp_hh)
        return _readonly(v["dx"]), (_readonly(v["dh"][None]), _readonly(v["dc"][None]))

    def zero_grad(self):
        """Set every gradient to zero."""
        self.flat_grads.fill(0)

    # -- parameters --------------------------------------------------------

    def state_dict(self):
        """Copies of the parameters, under torch's names and shapes."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict):
        """Load parameters saved by ``state_dict`` or converted from torch.

        Every key, type and shape is checked before anything is written; floating
        arrays of another dtype are cast to the model's.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = set(self.params)
        missing = sorted(expected - set(state_dict.keys()))
        unexpected = sorted(set(state_dict.keys()) - expected)
        if missing:
            raise KeyError(f"state_dict is missing {missing} (expected keys {sorted(expected)})")
        if unexpected:
            raise KeyError(f"state_dict has unexpected keys {unexpected} "
                           f"(expected keys {sorted(expected)})")
        for name, shape in self._layout:
            a = state_dict[name]
            check.float_array(f"state_dict[{name!r}]", a, self.dtype)
            check.shape(f"state_dict[{name!r}]", a, shape)
        for name, _ in self._layout:
            np.copyto(self.params[name], state_dict[name], casting="same_kind")
