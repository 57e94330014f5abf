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

The variants change the step to (each term only with its option; LN(a) =
gain * (a - mean(a)) / sqrt(var(a) + 1e-5) + bias over the feature axis, with the
biased variance)::

    r_{t-1} = h_{t-1} * mask                                    (recurrent dropout)
    z_t  = LN_ih(W_ih x_t) + LN_hh(W_hh r_{t-1}) + b_ih + b_hh   (layer norm)
    i_t  = sigmoid(z_i + w_ci * c_{t-1})   f_t = sigmoid(z_f + w_cf * c_{t-1})   (peephole)
    c~_t = clip(f_t * c_{t-1} + i_t * g_t)
    o_t  = sigmoid(z_o + w_co * c~_t)                           (peephole)
    h~_t = o_t * tanh(LN_c(c~_t))                               (layer norm)
    c_t  = z_c * c_{t-1} + (1 - z_c) * c~_t                     (zoneout; z = 0 without)
    h_t  = z_h * h_{t-1} + (1 - z_h) * h~_t

where ``mask`` (B, H) is 0 or 1/(1-p) per sequence and unit, the same at every step,
and z_h, z_c (T, B, H) are 1 where a unit keeps its previous value (in training) or
the zoneout probability (in evaluation). Their backward, step by step:

    dh~  = dh_t * (1 - z_h)             dh_{t-1} gets dh_t * z_h directly
    do   = dh~ * tanh(LN_c(c~))         ds = dh~ * o * (1 - tanh(LN_c(c~))^2)
    dc~  = LN_c'(ds) + do o(1-o) w_co + dc (1 - z_c)     dc_{t-1} gets dc * z_c
    dz   as above from dc~;   dc_{t-1} += dc~ f + dz_i w_ci + dz_f w_cf
    dW_ih x_t and dx_t see LN_ih'(dz); W_hh and dh_{t-1} see LN_hh'(dz), dh_{t-1}
    times the mask; dW_hh += LN_hh'(dz)^T r_{t-1}

with LN'(d) = (gain d - mean(gain d) - xn * mean(gain d * xn)) / sqrt(var + eps),
xn the normalised input; the gain's gradient is sum(d * xn), the bias's sum(d).

Everything here allocates freely and is written to be read beside these
equations, not to be fast.
"""
import numpy as np

from . import _options
from ._layout import carve, param_table

__all__ = ["forward", "backward", "sigmoid", "ReferenceLSTM"]

LN_NAMES = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_c_weight",
            "ln_c_bias")


def sigmoid(z):
    """Logistic function, written through tanh so it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _ln(a, gain, bias):
    """(LN(a), the normalised a, 1 / sqrt(var + eps)) over the last axis."""
    mu = a.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((a - mu) ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    xn = (a - mu) * rstd
    return gain * xn + bias, xn, rstd


def _ln_backward(d, xn, rstd, gain):
    """The gradient on LN's input, given d on its output."""
    gd = d * gain
    return rstd * (gd - gd.mean(axis=-1, keepdims=True)
                   - xn * (gd * xn).mean(axis=-1, keepdims=True))


def forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, cell_clip=None, lengths=None,
            peephole=None, layer_norm=None, zoneout=None, recurrent_mask=None):
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
    peephole : (w_ci, w_cf, w_co), each (H,), optional
    layer_norm : dict, optional
        ``ln_ih_weight``, ``ln_ih_bias``, ``ln_hh_weight``, ``ln_hh_bias`` (4H,),
        ``ln_c_weight``, ``ln_c_bias`` (H,).
    zoneout : (z_h, z_c), each (T, B, H), optional
        The weight each unit gives its previous value at each step.
    recurrent_mask : ndarray (B, H), optional
        Recurrent dropout's mask on h_{t-1}.

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
    new = lambda *s: np.zeros(s, dtype=x.dtype)  # noqa: E731
    gates = new(T, B, 4 * H)         # activations i, f, g, o
    c, c_raw, c_new = new(T, B, H), new(T, B, H), new(T, B, H)   # carried; before/after clip
    hs, y, r = new(T, B, H), new(T, B, H), new(T, B, H)   # carried h; output; what W_hh saw
    tc = new(T, B, H)                # tanh(LN_c(c~))
    ln = {k: new(T, B, n) for k, n in (("xn_ih", 4 * H), ("xn_hh", 4 * H), ("xn_c", H),
                                       ("rstd_ih", 1), ("rstd_hh", 1), ("rstd_c", 1))}
    z_h, z_c = zoneout if zoneout is not None else (new(T, B, H),) * 2
    h_prev, c_prev = h0, c0
    active = np.ones((T, B, 1), dtype=bool) if lengths is None else \
        (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[:, :, None]
    for t in range(T):
        r[t] = h_prev if recurrent_mask is None else h_prev * recurrent_mask
        zx, zr = x[t] @ weight_ih.T, r[t] @ weight_hh.T
        if layer_norm is not None:
            zx, ln["xn_ih"][t], ln["rstd_ih"][t] = _ln(zx, layer_norm["ln_ih_weight"],
                                                       layer_norm["ln_ih_bias"])
            zr, ln["xn_hh"][t], ln["rstd_hh"][t] = _ln(zr, layer_norm["ln_hh_weight"],
                                                       layer_norm["ln_hh_bias"])
        z = zx + bias_ih + zr + bias_hh
        zi, zf, zg, zo = np.split(z, 4, axis=1)
        if peephole is not None:
            zi, zf = zi + peephole[0] * c_prev, zf + peephole[1] * c_prev
        i, f, g = sigmoid(zi), sigmoid(zf), np.tanh(zg)
        c_raw[t] = f * c_prev + i * g
        c_new[t] = c_raw[t] if cell_clip is None else np.clip(c_raw[t], -cell_clip, cell_clip)
        if peephole is not None:
            zo = zo + peephole[2] * c_new[t]
        o = sigmoid(zo)
        s = c_new[t]
        if layer_norm is not None:
            s, ln["xn_c"][t], ln["rstd_c"][t] = _ln(s, layer_norm["ln_c_weight"],
                                                    layer_norm["ln_c_bias"])
        tc[t] = np.tanh(s)
        h_new = z_h[t] * h_prev + (1 - z_h[t]) * o * tc[t]
        c_next = z_c[t] * c_prev + (1 - z_c[t]) * c_new[t]
        c[t] = np.where(active[t], c_next, c_prev)
        hs[t] = np.where(active[t], h_new, h_prev)
        y[t] = np.where(active[t], h_new, 0)
        gates[t] = np.concatenate([i, f, g, o], axis=1)
        h_prev, c_prev = hs[t], c[t]
    cache = dict(x=x, h0=h0, c0=c0, weight_ih=weight_ih, weight_hh=weight_hh,
                 gates=gates, c=c, c_raw=c_raw, c_new=c_new, tc=tc, r=r, y=hs,
                 cell_clip=cell_clip, active=active, peephole=peephole, layer_norm=layer_norm,
                 z_h=z_h, z_c=z_c, recurrent_mask=recurrent_mask, **ln)
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
        ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` gradients, and with
        the variants ``weight_ci``, ``weight_cf``, ``weight_co`` and the LN names.
    """
    x, gates, c, tc = cache["x"], cache["gates"], cache["c"], cache["tc"]
    weight_ih, weight_hh = cache["weight_ih"], cache["weight_hh"]
    peep, ln, rmask = cache["peephole"], cache["layer_norm"], cache["recurrent_mask"]
    T, B, _ = x.shape
    H = c.shape[2]
    dx = np.empty_like(x)
    g_ = {k: np.zeros_like(v) for k, v in (("weight_ih", weight_ih), ("weight_hh", weight_hh))}
    g_["bias"] = np.zeros(4 * H, dtype=x.dtype)
    if peep is not None:
        g_.update(weight_ci=np.zeros(H, x.dtype), weight_cf=np.zeros(H, x.dtype),
                  weight_co=np.zeros(H, x.dtype))
    if ln is not None:
        g_.update({k: np.zeros_like(v) for k, v in ln.items()})
    dh, dc = dh_n.copy(), dc_n.copy()
    for t in reversed(range(T)):
        i, f, g, o = np.split(gates[t], 4, axis=1)
        c_prev = c[t - 1] if t > 0 else cache["c0"]
        act = cache["active"][t]
        z_h, z_c, c_new = cache["z_h"][t], cache["z_c"][t], cache["c_new"][t]
        dh_t = np.where(act, dy[t] + dh, 0)     # past a sequence's end nothing is computed
        dc_in = np.where(act, dc, 0)
        dht = dh_t * (1 - z_h)                  # on the cell's own h~_t
        do = dht * tc[t]
        ds = dht * o * (1.0 - tc[t] ** 2)       # on tanh's argument
        if ln is not None:
            g_["ln_c_weight"] += (ds * cache["xn_c"][t]).sum(axis=0)
            g_["ln_c_bias"] += ds.sum(axis=0)
            ds = _ln_backward(ds, cache["xn_c"][t], cache["rstd_c"][t], ln["ln_c_weight"])
        dzo = do * o * (1.0 - o)
        dc_t = ds + dc_in * (1 - z_c)           # on c~_t
        if peep is not None:
            dc_t = dc_t + dzo * peep[2]
            g_["weight_co"] += (dzo * c_new).sum(axis=0)
        if cache["cell_clip"] is not None:
            dc_t = dc_t * (np.abs(cache["c_raw"][t]) < cache["cell_clip"])
        dzi, dzf = dc_t * g * i * (1.0 - i), dc_t * c_prev * f * (1.0 - f)
        dz = np.concatenate([dzi, dzf, dc_t * i * (1.0 - g ** 2), dzo], axis=1)
        dc_prev = dc_t * f + dc_in * z_c
        if peep is not None:
            dc_prev = dc_prev + dzi * peep[0] + dzf * peep[1]
            g_["weight_ci"] += (dzi * c_prev).sum(axis=0)
            g_["weight_cf"] += (dzf * c_prev).sum(axis=0)
        g_["bias"] += dz.sum(axis=0)
        dzx = dzr = dz
        if ln is not None:
            for k in ("ih", "hh"):
                g_[f"ln_{k}_weight"] += (dz * cache[f"xn_{k}"][t]).sum(axis=0)
                g_[f"ln_{k}_bias"] += dz.sum(axis=0)
            dzx = _ln_backward(dz, cache["xn_ih"][t], cache["rstd_ih"][t], ln["ln_ih_weight"])
            dzr = _ln_backward(dz, cache["xn_hh"][t], cache["rstd_hh"][t], ln["ln_hh_weight"])
        g_["weight_ih"] += dzx.T @ x[t]
        g_["weight_hh"] += dzr.T @ cache["r"][t]
        dx[t] = dzx @ weight_ih
        dh_prev = dzr @ weight_hh
        if rmask is not None:
            dh_prev = dh_prev * rmask
        dh = np.where(act, dh_prev + dh_t * z_h, dh)   # ... and the state's gradient passes
        dc = np.where(act, dc_prev, dc)                # through
    db = g_.pop("bias")
    grads = dict(g_, bias_ih=db, bias_hh=db.copy())
    return dx, (dh, dc), grads


class ReferenceLSTM:
    """``fastlstm.LSTM``'s interface (one layer, one direction) over the functions
    above: the baseline that training loops and benchmarks run side by side with
    the fast path. No validation beyond refusing what it does not have, no
    buffers: every call allocates. The variants are options as in
    ``fastlstm.LSTM``; zoneout's and recurrent dropout's masks are drawn from a
    generator seeded as the fast layer's, in the same order, so that one seed gives
    both layers the same masks.
    """

    num_directions = 1

    #: the variant options, with their defaults (also fastlstm.LSTM's; _options' table)
    VARIANTS = tuple(_options.VARIANTS.items())

    def __init__(self, input_size, hidden_size, num_layers=1, dtype=np.float64, seed=None,
                 batch_first=False, forget_bias=0.0, **options):
        # fastlstm.LSTM's checks, then a refusal of what the reference does not have
        c = _options.layer_config(input_size, hidden_size, num_layers=num_layers, dtype=dtype,
                               seed=seed, batch_first=batch_first, forget_bias=forget_bias,
                               **options)
        default = _options.layer_config(1, 2)
        extra = {k: c[k] for k in options
                 if k not in dict(self.VARIANTS) and c[k] != default[k]}
        if c["num_layers"] != 1 or extra:
            raise ValueError(f"the reference is one layer, one direction, with no options "
                             f"but the variants; got num_layers={c['num_layers']}"
                             + (f" and {extra}" if extra else ""))
        H = c["hidden_size"]
        self.input_size, self.hidden_size, self.output_size = c["input_size"], H, H
        self.num_layers, self.batch_first, self.forget_bias = 1, c["batch_first"], \
            c["forget_bias"]
        self.dtype, self.seed = c["dtype"], c["seed"]
        input_size = self.input_size
        for k, _ in self.VARIANTS:
            setattr(self, k, c[k])
        self.training = True
        self._rng = np.random.default_rng(None if seed is None else [seed, 1])
        self._layout = [(name + "_l0", shape) for name, shape in
                        param_table(input_size, H, H, True, False, self.peephole,
                                    self.layer_norm)]
        n = sum(int(np.prod(s)) for _, s in self._layout)
        bound = 1.0 / np.sqrt(H)
        params = np.random.default_rng(seed).uniform(-bound, bound, n).astype(dtype)
        self.flat_params = None
        self.bind(params, np.zeros(n, dtype))
        self.params["bias_ih_l0"][H:2 * H] += self.forget_bias
        for name in LN_NAMES:
            if name + "_l0" in self.params:
                self.params[name + "_l0"][:] = 1.0 if name.endswith("weight") else 0.0
        self._cache = self.last_lengths = None

    def config(self):
        return dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=1,
                    batch_first=self.batch_first, forget_bias=self.forget_bias,
                    **{k: getattr(self, k) for k, _ in self.VARIANTS},
                    dtype=self.dtype.name, seed=self.seed)

    def _masks(self, T, B):
        """Zoneout's and recurrent dropout's, drawn as fastlstm.LSTM draws them."""
        H, dt, out = self.hidden_size, self.dtype, {}
        if self.zoneout or self.zoneout_cell:
            zs = []
            for p in (self.zoneout, self.zoneout_cell):
                if self.training and p > 0:
                    zs.append((self._rng.random((T, B, H), dtype=dt) < p).astype(dt))
                else:
                    zs.append(np.full((T, B, H), 0 if self.training else p, dt))
            out["zoneout"] = tuple(zs)
        if self.recurrent_dropout:
            p = self.recurrent_dropout
            out["recurrent_mask"] = ((self._rng.random((B, H), dtype=dt) >= p) / dt.type(1 - p)
                                     ).astype(dt) if self.training else np.ones((B, H), dt)
        return out

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
        p = {k[:-3]: v for k, v in self.params.items()}
        peephole = (p["weight_ci"], p["weight_cf"], p["weight_co"]) if self.peephole else None
        ln = {k: p[k] for k in LN_NAMES} if self.layer_norm else None
        y, (h_n, c_n), self._cache = forward(
            x.astype(self.dtype, copy=False), h0, c0, p["weight_ih"], p["weight_hh"],
            p["bias_ih"], p["bias_hh"], lengths=lengths, peephole=peephole, layer_norm=ln,
            **self._masks(T, B))
        self.last_lengths = np.full(B, T, np.int64) if lengths is None else \
            np.asarray(lengths, np.int64)
        return (y.transpose(1, 0, 2) if self.batch_first else y), (h_n[None], c_n[None])

    def backward(self, dy, dstate=None, input_grad=True):
        """As ``fastlstm.LSTM.backward``; input_grad=False returns None for dx (the
        reference computes it all the same)."""
        if self.batch_first:
            dy = dy.transpose(1, 0, 2)
        B, H = dy.shape[1], self.hidden_size
        dh_n, dc_n = ((np.zeros((B, H), self.dtype),) * 2 if dstate is None
                      else (dstate[0][0], dstate[1][0]))
        dx, (dh0, dc0), g = backward(dy.astype(self.dtype, copy=False), dh_n, dc_n, self._cache)
        for k in self.grads:
            self.grads[k] += g[k[:-3]]
        if not input_grad:
            dx = None
        elif self.batch_first:
            dx = dx.transpose(1, 0, 2)
        return dx, (dh0[None], dc0[None])
