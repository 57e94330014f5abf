"""The public LSTM layer: validates, owns the buffers, calls the kernels."""
import math

import numpy as np

from . import _validate as check
from ._config import exact_activations
from ._kernels import layer_backward, layer_forward, workspace_size, workspace_views

__all__ = ["LSTM"]


def _readonly(a):
    v = a.view()
    v.flags.writeable = False
    return v


class _Workspace:
    """One flat buffer for every activation and gradient of a (T, B) call, up to
    a capacity; ``views(T, B)`` carves it (with the kernels' own carving, so the
    two always agree) and caches the views, so a repeated shape costs nothing."""

    NAMES = ("x", "gates", "h", "c", "tanh_c", "rec", "dy", "dgates", "dx", "dh", "dc",
             "tmp_ih", "tmp_hh")

    def __init__(self, T, B, I, H, dtype):
        self.T, self.B, self.I, self.H = T, B, I, H
        self.flat = np.empty(workspace_size(T, B, I, H), dtype)
        self._cache = {}

    def fits(self, T, B):
        return T <= self.T and B <= self.B

    def views(self, T, B):
        v = self._cache.get((T, B))
        if v is None:
            v = dict(zip(self.NAMES, workspace_views(self.flat, T, B, self.I, self.H)))
            # what forward and backward hand back: read-only views
            v["y"], v["h_n"], v["c_n"] = (_readonly(v["h"][1:]), _readonly(v["h"][T:]),
                                          _readonly(v["c"][T:]))
            v["dx_out"], v["dh0"], v["dc0"] = (_readonly(v["dx"]), _readonly(v["dh"][None]),
                                               _readonly(v["dc"][None]))
            v["h0"], v["c0"] = v["h"][0], v["c"][0]
            self._cache[(T, B)] = v
        return v


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
        for buf, init in ((v["h0"], h0), (v["c0"], c0)):
            if init is None:
                buf.fill(0)
            else:
                np.copyto(buf, init[0], casting="same_kind")
        layer_forward(self.flat_params, self._ws.flat, T, B, self.input_size,
                      self.hidden_size, self._exact)
        self._last = (T, B)
        return v["y"], (v["h_n"], v["c_n"])

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
        layer_backward(self.flat_params, self.flat_grads, self._ws.flat, T, B,
                       self.input_size, self.hidden_size)
        return v["dx_out"], (v["dh0"], v["dc0"])

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
