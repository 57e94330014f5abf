"""The full layer against torch.nn.LSTM autograd: stacked layers, both
directions, projection, batch_first, bias=False and variable lengths; dropout,
cell_clip and forget_bias."""
import itertools

import numpy as np
import pytest

import fastlstm
from fastlstm import reference

from helpers import TOL, rel_err, run_ours, run_torch


def make_problem(seed, T, B, I, cfg, dtype):
    rng = np.random.default_rng(seed)
    m = fastlstm.LSTM(I, 6, dtype=dtype, seed=seed, **cfg)
    D = 2 if cfg.get("bidirectional") else 1
    L = cfg.get("num_layers", 1)
    P = cfg.get("proj_size", 0) or 6
    arr = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    x = arr(B, T, I) if cfg.get("batch_first") else arr(T, B, I)
    dy = arr(B, T, D * P) if cfg.get("batch_first") else arr(T, B, D * P)
    return m, dict(x=x, h0=arr(D * L, B, P), c0=arr(D * L, B, 6), dy=dy,
                   dh_n=arr(D * L, B, P), dc_n=arr(D * L, B, 6))


CONFIGS = []
for L, bi, proj, bf, bias, lens in itertools.product([1, 2, 3], [False, True], [0, 4],
                                                     [False, True], [True, False],
                                                     [False, True]):
    # every layer/direction/projection/lengths combination; batch_first and
    # bias=False on a rotating subset to keep the grid small
    if (bf or not bias) and (L + bi + (proj > 0) + lens) % 2:
        continue
    CONFIGS.append((dict(num_layers=L, bidirectional=bi, proj_size=proj, batch_first=bf,
                         bias=bias), lens))


def cfg_id(c):
    cfg, lens = c
    return "L{num_layers}{b}{p}{f}{n}{l}".format(
        b="-bi" if cfg["bidirectional"] else "",
        p=f"-proj{cfg['proj_size']}" if cfg["proj_size"] else "",
        f="-bf" if cfg["batch_first"] else "", n="" if cfg["bias"] else "-nobias",
        l="-lengths" if lens else "", **cfg)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CONFIGS, ids=[cfg_id(c) for c in CONFIGS])
def test_layer_matches_torch(torch, case, dtype):
    cfg, use_lengths = case
    T, B, I = 7, 5, 3
    m, prob = make_problem(11, T, B, I, cfg, dtype)
    lengths = [3, 7, 1, 5, 7] if use_lengths else None     # unsorted, with 1 and T
    got = run_ours(m, prob, lengths)
    want = run_torch(torch, m, prob, lengths, cfg)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) <= TOL[dtype], k


@pytest.mark.torch
def test_torch_state_dicts_of_every_configuration_load(torch):
    for L, bi, proj, bias in itertools.product([1, 2], [False, True], [0, 3], [True, False]):
        t = torch.nn.LSTM(4, 5, num_layers=L, bidirectional=bi, proj_size=proj, bias=bias)
        m = fastlstm.LSTM(4, 5, num_layers=L, bidirectional=bi, proj_size=proj, bias=bias)
        m.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
        assert list(m.params) == list(t.state_dict())


def test_padded_steps_are_ignored():
    """Garbage (even NaN) in x and dy past a sequence's length changes nothing."""
    m = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((6, 3, 3)), rng.standard_normal((6, 3, 8))
    lengths = [6, 2, 4]
    results = []
    for fill in (0.0, np.nan):
        xx, dd = x.copy(), dy.copy()
        for b, n in enumerate(lengths):
            xx[n:, b] = fill
            dd[n:, b] = fill
        y = m.forward(xx, lengths=lengths)[0].copy()
        m.zero_grad()
        dx = m.backward(dd)[0].copy()
        results.append((y, dx, m.flat_grads.copy()))
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    y, dx, _ = results[0]
    assert not y[2:, 1].any() and not dx[2:, 1].any()


def test_stateful_chunks_equal_one_pass():
    """Truncated BPTT's forward: the state of one chunk starts the next."""
    m = fastlstm.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=1)
    x = np.random.default_rng(1).standard_normal((12, 2, 3))
    full = m.forward(x)[0].copy()
    state, parts = None, []
    for k in range(0, 12, 4):
        y, state = m.forward(x[k:k + 4], state)
        state = (state[0].copy(), state[1].copy())
        parts.append(y.copy())
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-14)


# -- dropout ----------------------------------------------------------------

def dropout_model(seed=3, p=0.4):
    return fastlstm.LSTM(3, 5, num_layers=3, dropout=p, dtype=np.float64, seed=seed)


def test_dropout_same_seed_same_result_and_eval_is_identity():
    x = np.random.default_rng(2).standard_normal((4, 3, 3))
    a, b = dropout_model(), dropout_model()
    ya, yb = a.forward(x)[0].copy(), b.forward(x)[0].copy()
    assert np.array_equal(ya, yb)
    assert not np.array_equal(ya, a.forward(x)[0])          # a new mask per forward
    plain = fastlstm.LSTM(3, 5, num_layers=3, dtype=np.float64, seed=3)
    assert np.array_equal(a.eval().forward(x)[0], plain.forward(x)[0])
    assert not a.training and a.train().training


def test_dropout_gradient_by_finite_differences():
    """With the mask held fixed (the same generator state for every forward),
    backward is the exact gradient of the dropped-out network."""
    m = dropout_model()
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 5))
    start = m.get_rng_state()

    def loss():
        m.set_rng_state(start)
        return float(np.sum(m.forward(x)[0] * dy))

    loss()
    m.zero_grad()
    m.backward(dy)
    eps = 1e-6
    for idx in rng.choice(m.flat_params.size, 40, replace=False):
        keep = m.flat_params[idx]
        m.flat_params[idx] = keep + eps
        up = loss()
        m.flat_params[idx] = keep - eps
        down = loss()
        m.flat_params[idx] = keep
        assert abs((up - down) / (2 * eps) - m.flat_grads[idx]) <= 1e-6 * max(
            1.0, abs(m.flat_grads[idx]))


# -- beyond torch: cell_clip and forget_bias ------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
def test_cell_clip_against_reference(dtype):
    rng = np.random.default_rng(6)
    T, B, I, H = 8, 3, 4, 5
    m = fastlstm.LSTM(I, H, dtype=dtype, seed=0, cell_clip=0.3)
    m.flat_params *= 8       # big weights so that the clip is active often
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    y, (_, c_n) = m.forward(x)
    assert np.abs(c_n).max() <= 0.3 + 1e-7
    dx = m.backward(dy)[0]
    p = {k: v.astype(np.float64) for k, v in m.params.items()}
    zeros = np.zeros((B, H))
    y_ref, (_, c_ref), cache = reference.forward(
        x.astype(np.float64), zeros, zeros, p["weight_ih_l0"], p["weight_hh_l0"],
        p["bias_ih_l0"], p["bias_hh_l0"], cell_clip=0.3)
    assert (np.abs(cache["c_raw"]) > 0.3).mean() > 0.2
    dx_ref, _, g = reference.backward(dy.astype(np.float64), zeros, zeros, cache)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol and rel_err(dx, dx_ref) <= tol
    assert rel_err(m.grads["weight_hh_l0"], g["weight_hh"]) <= tol


def test_reference_cell_clip_gradient_by_finite_differences():
    rng = np.random.default_rng(7)
    T, B, I, H = 4, 2, 2, 3
    W = [2 * rng.standard_normal(s) for s in [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]]
    x, dy = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    zeros = np.zeros((B, H))

    def loss(W):
        return float(np.sum(reference.forward(x, zeros, zeros, *W, cell_clip=0.5)[0] * dy))

    cache = reference.forward(x, zeros, zeros, *W, cell_clip=0.5)[2]
    g = reference.backward(dy, zeros, zeros, cache)[2]["weight_ih"]
    num = np.empty_like(W[0])
    for idx in np.ndindex(W[0].shape):
        keep = W[0][idx]
        W[0][idx] = keep + 1e-6
        up = loss(W)
        W[0][idx] = keep - 1e-6
        down = loss(W)
        W[0][idx] = keep
        num[idx] = (up - down) / 2e-6
    assert rel_err(g, num) <= 1e-6


def test_forget_bias_added_at_initialisation():
    a = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, seed=0)
    b = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, seed=0, forget_bias=1.0)
    for k in a.params:
        diff = b.params[k] - a.params[k]
        if k.startswith("bias_ih"):
            np.testing.assert_allclose(diff[4:8], 1.0, rtol=1e-6)
            assert not diff[:4].any() and not diff[8:].any()
        else:
            assert not diff.any()


def test_defaults_leave_torch_behaviour_unchanged():
    """The defaults add nothing beyond torch.nn.LSTM: a forget-bias shift, a cell clip
    or dropout between layers switched on by default would each fail here."""
    H = 4
    deep = fastlstm.LSTM(3, H, num_layers=2, seed=0, dtype=np.float64)
    bound = 1 / np.sqrt(H)                  # torch's U(-1/sqrt(H), 1/sqrt(H)), forget gate too
    assert all(np.abs(v).max() <= bound for v in deep.params.values())
    x = np.random.default_rng(0).standard_normal((6, 2, 3))
    assert deep.training
    assert np.array_equal(deep.forward(x)[0].copy(), deep.forward(x)[0])   # no dropout mask
    m = fastlstm.LSTM(3, H, seed=0, dtype=np.float64)
    m.flat_params *= 20                     # cells far past any plausible clip
    zeros = np.zeros((2, H))
    p = m.params
    want, (_, c_n), _ = reference.forward(x, zeros, zeros, p["weight_ih_l0"], p["weight_hh_l0"],
                                          p["bias_ih_l0"], p["bias_hh_l0"])
    assert np.abs(c_n).max() > 3
    assert rel_err(m.forward(x)[0], want) <= 1e-10


