"""Helpers shared by the test modules (fixtures live in conftest.py)."""
import numpy as np

#: The accuracy contract, one figure per dtype, that the README states: outputs,
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
    y, (h_n, c_n) = m.forward(prob["x"], (prob["h0"], prob["c0"]), lengths=lengths)
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
