"""The LSTM in plain NumPy: the readable oracle and the speed baseline.

One layer, one direction, the whole sequence. Gate order (i, f, g, o) and
parameter shapes as in ``torch.nn.LSTM``. For t = 0 .. T-1::

    z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh        (4H,) split as i, f, g, o
    i_t = sigmoid(z_i)   f_t = sigmoid(z_f)   g_t = tanh(z_g)   o_t = sigmoid(z_o)
    c_t = f_t * c_{t-1} + i_t * g_t
    h_t = o_t * tanh(c_t)

with h_{-1} = h0 and c_{-1} = c0. Backpropagation through time, t = T-1 .. 0,
with dh and dc the errors carried back from step t+1 (dh_n, dc_n at t = T-1)::

    dh_t  = dy_t + dh                      (the output and the recurrence, each once)
    do_t  = dh_t * tanh(c_t)
    dc_t  = dc + dh_t * o_t * (1 - tanh(c_t)^2)
    di_t  = dc_t * g_t      df_t = dc_t * c_{t-1}      dg_t = dc_t * i_t
    dz    = [di*i(1-i), df*f(1-f), dg*(1-g^2), do*o(1-o)]     (the gates' derivatives)
    dW_ih += dz x_t^T       dW_hh += dz h_{t-1}^T       db_ih += dz      db_hh += dz
    dx_t  = W_ih^T dz       dh = W_hh^T dz              dc = dc_t * f_t

and finally dh0 = dh, dc0 = dc. With a cell clip, c_t = clip(c_t, -cell_clip, cell_clip)
and dc_t is zero wherever the clip was active. Batched: rows are sequences, so ``x_t`` is
(B, I) and the products above become ``z = x W_ih^T + h W_hh^T``.

Everything here allocates freely and is written to be read beside these
equations, not to be fast.
"""
import numpy as np

from ._layout import carve, param_table

__all__ = ["forward", "backward", "sigmoid"]


def sigmoid(z):
    """Logistic function, written through tanh so it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, cell_clip=None, lengths=None):
    """Run the LSTM over a whole sequence.

    Parameters
    ----------
    x : ndarray (T, B, I)
    h0, c0 : ndarray (B, H)
    weight_ih : ndarray (4H, I)
    weight_hh : ndarray (4H, H)
    bias_ih, bias_hh : ndarray (4H,)
    cell_clip : float, optional
    lengths : int array (B,), optional
        Sequence b runs steps [0, lengths[b]); past them its state is carried
        unchanged and its output is zero.

    Returns
    -------
    y : ndarray (T, B, H)
        h_t for every step.
    (h_n, c_n) : ndarrays (B, H)
        The state after the last step.
    cache : dict
        What ``backward`` needs.
    """
    T, B, _ = x.shape
    H = h0.shape[1]
    gates = np.empty((T, B, 4 * H), dtype=x.dtype)   # activations i, f, g, o
    c = np.empty((T, B, H), dtype=x.dtype)
    c_raw = np.empty((T, B, H), dtype=x.dtype)     # before the clip
    y = np.empty((T, B, H), dtype=x.dtype)
    h_prev, c_prev = h0, c0
    hs = np.empty((T, B, H), dtype=x.dtype)        # the state after step t (carried past the end)
    active = np.ones((T, B, 1), dtype=bool) if lengths is None else \
        (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[:, :, None]
    for t in range(T):
        z = x[t] @ weight_ih.T + bias_ih + h_prev @ weight_hh.T + bias_hh
        i = sigmoid(z[:, 0 * H:1 * H])
        f = sigmoid(z[:, 1 * H:2 * H])
        g = np.tanh(z[:, 2 * H:3 * H])
        o = sigmoid(z[:, 3 * H:4 * H])
        c_raw[t] = f * c_prev + i * g
        c_new = c_raw[t] if cell_clip is None else np.clip(c_raw[t], -cell_clip, cell_clip)
        h_new = o * np.tanh(c_new)
        c[t] = np.where(active[t], c_new, c_prev)
        hs[t] = np.where(active[t], h_new, h_prev)
        y[t] = np.where(active[t], h_new, 0)
        gates[t] = np.concatenate([i, f, g, o], axis=1)
        h_prev, c_prev = hs[t], c[t]
    cache = dict(x=x, h0=h0, c0=c0, weight_ih=weight_ih, weight_hh=weight_hh,
                 gates=gates, c=c, c_raw=c_raw, y=hs, cell_clip=cell_clip, active=active)
    return y, (hs[-1], c[-1]), cache


def backward(dy, dh_n, dc_n, cache):
    """Backpropagate through time.

    Parameters
    ----------
    dy : ndarray (T, B, H)
        Gradient of the loss with respect to every output h_t.
    dh_n, dc_n : ndarray (B, H)
        Gradient with respect to the final state.
    cache : dict
        From ``forward``.

    Returns
    -------
    dx : ndarray (T, B, I)
    (dh0, dc0) : ndarrays (B, H)
    grads : dict
        ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` gradients.
    """
    x, gates, c, y = cache["x"], cache["gates"], cache["c"], cache["y"]
    weight_ih, weight_hh = cache["weight_ih"], cache["weight_hh"]
    T, B, _ = x.shape
    H = c.shape[2]
    dx = np.empty_like(x)
    dW_ih = np.zeros_like(weight_ih)
    dW_hh = np.zeros_like(weight_hh)
    db = np.zeros(4 * H, dtype=x.dtype)
    dh, dc = dh_n.copy(), dc_n.copy()
    for t in reversed(range(T)):
        i, f, g, o = np.split(gates[t], 4, axis=1)
        c_prev = c[t - 1] if t > 0 else cache["c0"]
        h_prev = y[t - 1] if t > 0 else cache["h0"]
        act = cache["active"][t]
        tanh_c = np.tanh(c[t])
        dh_t = dy[t] + dh
        do = dh_t * tanh_c
        dc_t = dc + dh_t * o * (1.0 - tanh_c ** 2)
        if cache["cell_clip"] is not None:
            dc_t = dc_t * (np.abs(cache["c_raw"][t]) < cache["cell_clip"])
        di = dc_t * g
        df = dc_t * c_prev
        dg = dc_t * i
        dz = np.concatenate([di * i * (1.0 - i),
                             df * f * (1.0 - f),
                             dg * (1.0 - g ** 2),
                             do * o * (1.0 - o)], axis=1)
        dz = np.where(act, dz, 0)               # past a sequence's end nothing is computed
        dW_ih += dz.T @ x[t]
        dW_hh += dz.T @ h_prev
        db += dz.sum(axis=0)
        dx[t] = dz @ weight_ih
        dh = np.where(act, dz @ weight_hh, dh)   # ... and the state's gradient passes through
        dc = np.where(act, dc_t * f, dc)
    grads = dict(weight_ih=dW_ih, weight_hh=dW_hh, bias_ih=db, bias_hh=db.copy())
    return dx, (dh, dc), grads


class ReferenceLSTM:
    """``fastlstm.LSTM``'s interface (one layer, one direction) over the functions
    above: the baseline that training loops and benchmarks run side by side with
    the fast path. No validation beyond refusing what it does not have, no
    buffers: every call allocates.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, dtype=np.float64, seed=None,
                 batch_first=False, forget_bias=0.0, **options):
        if num_layers != 1 or options:
            raise ValueError(f"the reference is one plain layer, one direction; got "
                             f"num_layers={num_layers}" + (f" and {options}" if options else ""))
        H = hidden_size
        self.input_size, self.hidden_size, self.output_size = input_size, H, H
        self.num_layers, self.batch_first, self.forget_bias = 1, batch_first, float(forget_bias)
        self.dtype, self.seed = np.dtype(dtype), seed
        self.training = True
        self._rng = np.random.default_rng(None if seed is None else [seed, 1])  # no dropout here
        self._layout = [(name + "_l0", shape)
                        for name, shape in param_table(input_size, H, H, True, False)]
        n = sum(int(np.prod(s)) for _, s in self._layout)
        bound = 1.0 / np.sqrt(H)
        params = np.random.default_rng(seed).uniform(-bound, bound, n).astype(dtype)
        self.flat_params = None
        self.bind(params, np.zeros(n, dtype))
        self.params["bias_ih_l0"][H:2 * H] += self.forget_bias
        self._cache = self.last_lengths = None

    def config(self):
        return dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=1,
                    batch_first=self.batch_first, forget_bias=self.forget_bias,
                    dtype=self.dtype.name, seed=self.seed)

    def bind(self, flat_params, flat_grads):
        if self.flat_params is not None:
            flat_params[:] = self.flat_params
            flat_grads[:] = self.flat_grads
        self.flat_params, self.flat_grads = flat_params, flat_grads
        self.params = carve(flat_params, self._layout)
        self.grads = carve(flat_grads, self._layout)

    def get_rng_state(self):
        return self._rng.bit_generator.state

    def set_rng_state(self, state):
        self._rng.bit_generator.state = state

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def load_state_dict(self, state_dict):
        for k in self.params:
            self.params[k][...] = state_dict[k]

    def zero_grad(self):
        self.flat_grads.fill(0)

    def forward(self, x, state=None, lengths=None):
        if self.batch_first:
            x = x.transpose(1, 0, 2)
        T, B, H = x.shape[0], x.shape[1], self.hidden_size
        h0, c0 = ((np.zeros((B, H), self.dtype),) * 2 if state is None
                  else (state[0][0], state[1][0]))
        p = self.params
        y, (h_n, c_n), self._cache = forward(
            x.astype(self.dtype, copy=False), h0, c0, p["weight_ih_l0"], p["weight_hh_l0"],
            p["bias_ih_l0"], p["bias_hh_l0"], lengths=lengths)
        self.last_lengths = np.full(B, T, np.int64) if lengths is None else \
            np.asarray(lengths, np.int64)
        return (y.transpose(1, 0, 2) if self.batch_first else y), (h_n[None], c_n[None])

    def backward(self, dy, dstate=None):
        if self.batch_first:
            dy = dy.transpose(1, 0, 2)
        B, H = dy.shape[1], self.hidden_size
        dh_n, dc_n = ((np.zeros((B, H), self.dtype),) * 2 if dstate is None
                      else (dstate[0][0], dstate[1][0]))
        dx, (dh0, dc0), g = backward(dy.astype(self.dtype, copy=False), dh_n, dc_n, self._cache)
        for k in self.grads:
            self.grads[k] += g[k[:-3]]
        return (dx.transpose(1, 0, 2) if self.batch_first else dx), (dh0[None], dc0[None])
