"""Helpers shared by the test modules (fixtures live in conftest.py)."""
import numpy as np

#: The accuracy contract, one figure per dtype, that docs/guarantees.md states: outputs,
#: states and every gradient against torch autograd and the reference, as rel_err.
TOL = {np.float64: 1e-10, np.float32: 5e-5}


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the oracle b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def random_params(rng, I, H, dtype, scale=0.5):
    return {
        "weight_ih_l0": (scale * rng.standard_normal((4 * H, I))).astype(dtype),
        "weight_hh_l0": (scale * rng.standard_normal((4 * H, H))).astype(dtype),
        "bias_ih_l0": (0.2 * rng.standard_normal(4 * H)).astype(dtype),
        "bias_hh_l0": (0.2 * rng.standard_normal(4 * H)).astype(dtype),
    }


def random_problem(seed, T, B, I, H, dtype):
    """Parameters, inputs, initial state and upstream gradients for one test case."""
    rng = np.random.default_rng(seed)
    p = random_params(rng, I, H, dtype)
    arr = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return dict(params=p, x=arr(T, B, I), h0=arr(1, B, H), c0=arr(1, B, H),
                dy=arr(T, B, H), dh_n=arr(1, B, H), dc_n=arr(1, B, H))


def run_fastlstm(prob, dtype, with_state=True):
    """Forward + backward through fastlstm.LSTM; copies of every result."""
    import fastlstm
    T, B, I = prob["x"].shape
    H = prob["h0"].shape[2]
    m = fastlstm.LSTM(I, H, dtype=dtype)
    m.load_state_dict(prob["params"])
    state = (prob["h0"], prob["c0"]) if with_state else None
    y, (h_n, c_n) = m.forward(prob["x"], state)
    out = dict(y=y.copy(), h_n=h_n.copy(), c_n=c_n.copy())
    dx, (dh0, dc0) = m.backward(prob["dy"], (prob["dh_n"], prob["dc_n"]))
    out.update(x=dx.copy(), h0=dh0.copy(), c0=dc0.copy())
    out.update({k: v.copy() for k, v in m.grads.items()})
    return out


def run_reference(prob):
    from fastlstm import reference
    p = prob["params"]
    y, (h_n, c_n), cache = reference.forward(
        prob["x"], prob["h0"][0], prob["c0"][0], p["weight_ih_l0"], p["weight_hh_l0"],
        p["bias_ih_l0"], p["bias_hh_l0"])
    dx, (dh0, dc0), g = reference.backward(prob["dy"], prob["dh_n"][0], prob["dc_n"][0], cache)
    return dict(y=y, h_n=h_n[None], c_n=c_n[None], x=dx, h0=dh0[None], c0=dc0[None],
                weight_ih_l0=g["weight_ih"], weight_hh_l0=g["weight_hh"],
                bias_ih_l0=g["bias_ih"], bias_hh_l0=g["bias_hh"])


RESULT_KEYS = ("y", "h_n", "c_n", "x", "h0", "c0",
               "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def run_ours(m, prob, lengths):
    y, (h_n, c_n) = m.forward(prob["x"], (prob["h0"], prob["c0"]), lengths=lengths,
                              keep=True)   # evaluation mode too: its graph is checked
    out = dict(y=y.copy(), h_n=h_n.copy(), c_n=c_n.copy())
    m.zero_grad()
    dx, (dh0, dc0) = m.backward(prob["dy"], (prob["dh_n"], prob["dc_n"]))
    out.update(x=dx.copy(), h0=dh0.copy(), c0=dc0.copy())
    out.update({k: v.copy() for k, v in m.grads.items()})
    return out


def run_torch(torch, m, prob, lengths, cfg):
    tdt = torch.float64 if m.dtype == np.float64 else torch.float32
    kw = {k: v for k, v in cfg.items() if k in ("num_layers", "bias", "batch_first",
                                                 "bidirectional", "proj_size")}
    lstm = torch.nn.LSTM(m.input_size, m.hidden_size, **kw).to(tdt)
    lstm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    leaf = lambda a: torch.tensor(a, dtype=tdt, requires_grad=True)  # noqa: E731
    x, h0, c0 = leaf(prob["x"]), leaf(prob["h0"]), leaf(prob["c0"])
    bf = cfg.get("batch_first", False)
    T = prob["x"].shape[1 if bf else 0]
    if lengths is None:
        y, (h_n, c_n) = lstm(x, (h0, c0))
    else:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=bf,
                                      enforce_sorted=False)
        out, (h_n, c_n) = lstm(packed, (h0, c0))
        y, _ = pad_packed_sequence(out, batch_first=bf, total_length=T)
    t = lambda a: torch.tensor(a, dtype=tdt)  # noqa: E731
    loss = ((y * t(prob["dy"])).sum() + (h_n * t(prob["dh_n"])).sum()
            + (c_n * t(prob["dc_n"])).sum())
    loss.backward()
    out = dict(y=y, h_n=h_n, c_n=c_n, x=x.grad, h0=h0.grad, c0=c0.grad)
    out.update({k: p.grad for k, p in lstm.named_parameters()})
    return {k: v.detach().numpy() for k, v in out.items()}


def torch_step_loop(torch, m, prob, lengths, masks=None):
    """The LSTM with every option and variant, written as a loop of torch autograd
    ops over steps (what a user of torch writes for a variant torch.nn.LSTM lacks),
    with m's parameters and the masks m's last forward used (``m.last_masks``), or `masks`.
    Returns what ``run_ours`` returns: outputs, states and every gradient."""
    tdt = torch.float64 if m.dtype == np.float64 else torch.float32
    leaf = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=tdt,  # noqa: E731
                                  requires_grad=True)
    t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=tdt)  # noqa: E731
    params = {k: leaf(v) for k, v in m.state_dict().items()}
    masks = m.last_masks if masks is None else masks
    bf = m.batch_first
    x = leaf(prob["x"])
    h0, c0 = leaf(prob["h0"]), leaf(prob["c0"])
    xt = x.transpose(0, 1) if bf else x
    T, B = xt.shape[:2]
    L, D = m.num_layers, m.num_directions
    lens = np.full(B, T) if lengths is None else np.asarray(lengths)
    steps = np.arange(T)[:, None]
    valid = t((steps < lens[None, :])[:, :, None])                 # (T, B, 1)
    rev = np.maximum(lens[None, :] - 1 - steps, 0)                  # (T, B): reversed time
    cols = np.arange(B)[None, :]
    clip = m.cell_clip

    def ln(a, gain, bias):
        mu = a.mean(-1, keepdim=True)
        var = ((a - mu) ** 2).mean(-1, keepdim=True)
        return (a - mu) / torch.sqrt(var + 1e-5) * gain + bias

    def direction(inp, j, sfx):
        p = lambda name: params[name + sfx]  # noqa: E731
        h, c = h0[j], c0[j]
        ys = []
        for s in range(T):
            hin = h * t(masks["recurrent"][j]) if m.recurrent_dropout else h
            zx, zr = inp[s] @ p("weight_ih").T, hin @ p("weight_hh").T
            if m.layer_norm:
                zx = ln(zx, p("ln_ih_weight"), p("ln_ih_bias"))
                zr = ln(zr, p("ln_hh_weight"), p("ln_hh_bias"))
            z = zx + zr
            if m.bias:
                z = z + p("bias_ih") + p("bias_hh")
            zi, zf, zg, zo = z.chunk(4, 1)
            if m.peephole:
                zi, zf = zi + p("weight_ci") * c, zf + p("weight_cf") * c
            i, f, g = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg)
            cn = f * c + i * g
            if clip is not None:
                cn = torch.clamp(cn, -clip, clip)
            if m.peephole:
                zo = zo + p("weight_co") * cn
            o = torch.sigmoid(zo)
            cc = ln(cn, p("ln_c_weight"), p("ln_c_bias")) if m.layer_norm else cn
            hn = o * torch.tanh(cc)
            if m.proj_size:
                hn = hn @ p("weight_hr").T
            if m.zoneout or m.zoneout_cell:
                zh, zc = t(masks["zoneout_h"][j, s]), t(masks["zoneout_c"][j, s])
                hn, cn = zh * h + (1 - zh) * hn, zc * c + (1 - zc) * cn
            h = valid[s] * hn + (1 - valid[s]) * h
            c = valid[s] * cn + (1 - valid[s]) * c
            ys.append(valid[s] * h)
        return torch.stack(ys), h, c

    src, hn_all, cn_all = xt, [], []
    for k in range(L):
        outs = []
        for d in range(D):
            j = k * D + d
            sfx = f"_l{k}" + ("_reverse" if d else "")
            inp = src if d == 0 else src[rev, cols] * valid
            y, h, c = direction(inp, j, sfx)
            outs.append(y if d == 0 else y[rev, cols] * valid)
            hn_all.append(h)
            cn_all.append(c)
        src = torch.cat(outs, -1)
        if k < L - 1 and masks["dropout"][k] is not None:
            src = src * t(masks["dropout"][k])
    y = src.transpose(0, 1) if bf else src
    h_n, c_n = torch.stack(hn_all), torch.stack(cn_all)
    loss = ((y * t(prob["dy"])).sum() + (h_n * t(prob["dh_n"])).sum()
            + (c_n * t(prob["dc_n"])).sum())
    loss.backward()
    out = dict(y=y, h_n=h_n, c_n=c_n, x=x.grad, h0=h0.grad, c0=c0.grad)
    out.update({k: v.grad for k, v in params.items()})
    return {k: v.detach().numpy() for k, v in out.items()}
