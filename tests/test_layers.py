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


# -- the batch split over threads ----------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CONFIGS[::3], ids=[cfg_id(c) for c in CONFIGS[::3]])
def test_batch_split_over_threads_matches_torch_and_one_thread(torch, monkeypatch, case, dtype):
    """Every size splits here (no work threshold): parts of 1 to 3 sequences run on
    their own threads and their gradients are summed."""
    from fastlstm import _threads
    monkeypatch.setattr(_threads, "SPLIT_WORK", 0)
    cfg, use_lengths = case
    lengths = [3, 7, 1, 5, 7] if use_lengths else None
    results = {}
    for threads in (1, 2, 3):
        m, prob = make_problem(11, 7, 5, 3, dict(cfg, threads=threads), dtype)
        results[threads] = run_ours(m, prob, lengths)
        assert len(m._last.split) == threads
    want = run_torch(torch, m, prob, lengths, cfg)
    for threads, got in results.items():
        for k in want:
            assert rel_err(got[k], want[k]) <= TOL[dtype], (threads, k)
    again = run_ours(m, prob, lengths)                # a fixed count repeats bitwise
    for k in again:
        assert np.array_equal(again[k], results[3][k]), k


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
def test_packed_products_and_blas_agree(monkeypatch, dtype):
    """An unsplit call whose BLAS may use two threads multiplies through BLAS; under a
    one-thread limit it uses the packed products (_gemm). H = 64, I = 64: every product
    packs in both dtypes; B = 7 leaves three rows past the micro-kernel's blocks."""
    from threadpoolctl import threadpool_limits

    from fastlstm import _threads
    monkeypatch.setattr(_threads, "SPLIT_WORK", 0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 7, 64)).astype(dtype)
    dy = rng.standard_normal((6, 7, 128)).astype(dtype)
    got = {}
    for limit in (2, 1):        # 2, not the default: under a one-thread BLAS (OPENBLAS_NUM_
        m = fastlstm.LSTM(64, 64, num_layers=2, bidirectional=True, dtype=dtype, seed=4,
                          threads=1)           # THREADS=1) both runs would be packed
        with threadpool_limits(limit):
            y = m.forward(x)[0].copy()
            dx = m.backward(dy)[0].copy()
        got[limit] = (m._last.one_thread, y, dx, m.flat_grads.copy())
    assert got[1][0] and not got[2][0]          # the two paths, each checked taken
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, b in zip(got[2][1:], got[1][1:]):
        assert rel_err(a, b) <= tol


def test_batch_split_keeps_dropout_masks(monkeypatch):
    """The masks are drawn for the whole batch before it is split: the same at any count."""
    from fastlstm import _threads
    monkeypatch.setattr(_threads, "SPLIT_WORK", 0)
    x = np.random.default_rng(0).standard_normal((6, 4, 3))
    ys = [fastlstm.LSTM(3, 5, num_layers=3, dropout=0.5, dtype=np.float64, seed=2,
                        threads=t).forward(x)[0].copy() for t in (1, 2)]
    np.testing.assert_allclose(ys[0], ys[1], rtol=1e-13, atol=1e-15)


# -- repeated calls take a plan (lstm._Plan): the same results as the general path --------

def _fwd_bwd(m, x, dy, **kw):
    y, (h, c) = m.forward(x, **kw)
    out = [y.copy(), h.copy(), c.copy()]
    dx, (dh0, dc0) = m.backward(dy)
    return out + [dx.copy(), dh0.copy(), dc0.copy(), m.flat_grads.copy()]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planned_calls_equal_the_first_call(batch_first, dtype):
    rng = np.random.default_rng(3)
    m = fastlstm.LSTM(4, 5, batch_first=batch_first, dtype=dtype, seed=0)
    shape = (3, 6, 4) if batch_first else (6, 3, 4)
    x = rng.standard_normal(shape)                    # float64: cast on the way in
    dy = rng.standard_normal(shape[:2] + (5,)).astype(dtype)
    first = _fwd_bwd(m, x, dy)
    assert x.shape in m._plans                         # the second call is planned
    for _ in range(2):
        m.zero_grad()
        again = _fwd_bwd(m, x, dy)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    # a call with a state or lengths at the same shape takes the general path
    m.zero_grad()
    state = (np.zeros((1, 3, 5), dtype), np.zeros((1, 3, 5), dtype))
    for a, b in zip(first, _fwd_bwd(m, x, dy, state=state)):
        np.testing.assert_array_equal(a, b)
    m.zero_grad()
    full = [shape[0 if not batch_first else 1]] * 3
    for a, b in zip(first, _fwd_bwd(m, x, dy, lengths=full)):
        np.testing.assert_array_equal(a, b)
    # a non-zero state (and dstate) must not leak into the next planned call
    m.forward(x, state=(np.ones((1, 3, 5), dtype), np.ones((1, 3, 5), dtype)))
    m.backward(dy, dstate=(np.ones((1, 3, 5), dtype), np.ones((1, 3, 5), dtype)))
    m.zero_grad()
    for a, b in zip(first, _fwd_bwd(m, x, dy)):
        np.testing.assert_array_equal(a, b)


def test_plans_follow_the_workspace_and_the_parameters():
    rng = np.random.default_rng(4)
    m = fastlstm.LSTM(2, 3, dtype=np.float64, seed=0)
    small, big = rng.standard_normal((3, 1, 2)), rng.standard_normal((7, 4, 2))
    ref = fastlstm.LSTM(2, 3, dtype=np.float64, seed=0)
    for x in (small, small, big, small, small):       # the big call grows the workspace
        dy = np.ones(x.shape[:2] + (3,))
        m.zero_grad()
        ref.zero_grad()
        got, want = _fwd_bwd(m, x, dy), _fwd_bwd(ref, x, dy)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
        ref._plans.clear()                             # ref always takes the general path
    # moving the parameters (bind) must not leave a plan on the old buffers
    p, g = np.empty_like(m.flat_params), np.zeros_like(m.flat_grads)
    m.bind(p, g)
    m.flat_params *= 0.5
    ref.flat_params *= 0.5
    for x in (small, small):
        m.zero_grad()
        ref.zero_grad()
        got, want = _fwd_bwd(m, x, np.ones((3, 1, 3))), _fwd_bwd(ref, x, np.ones((3, 1, 3)))
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
        assert np.shares_memory(m.flat_grads, g)


def test_a_planned_shape_still_refuses_bad_input():
    m = fastlstm.LSTM(2, 3, seed=0)
    x = np.zeros((3, 1, 2), np.float32)
    m.forward(x)
    m.forward(x)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        m.forward(np.zeros((3, 1, 2), np.int64))
    m.forward(x)
    with pytest.raises(ValueError, match="dy must have shape"):
        m.backward(np.zeros((3, 1, 4), np.float32))
    with pytest.raises(TypeError, match="dy must be a numpy.ndarray"):
        m.backward([[0.0]])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_plans_equal_the_first_call(batch_first, dtype):
    """A repeated split call (lstm._SplitPlan: part 0 here, part 1 on a server thread
    that waits in compiled code) gives bitwise what the first, general, call gave; and
    alternating shapes moves each server between plans without mixing them up."""
    rng = np.random.default_rng(5)
    m = fastlstm.LSTM(16, 32, batch_first=batch_first, dtype=dtype, seed=0, threads=2)
    shapes = [(50, 8), (80, 5), (3, 2)]          # two split (B = 5: parts of 2 and 3), one not
    cases, kinds = [], []
    for T, B in shapes:
        x = rng.standard_normal((B, T, 16) if batch_first else (T, B, 16)).astype(dtype)
        dy = rng.standard_normal(x.shape[:2] + (32,)).astype(dtype)
        m.zero_grad()
        cases.append((x, dy, _fwd_bwd(m, x, dy)))
        kinds.append(type(m._plans[x.shape]).__name__)
    assert kinds == ["_SplitPlan", "_SplitPlan", "_Plan"]
    for x, dy, first in cases * 2 + cases[:1] * 2:
        m.zero_grad()
        for a, b in zip(first, _fwd_bwd(m, x, dy)):
            np.testing.assert_array_equal(a, b)
    # x of another dtype (float64 holding float32's values: cast exactly), and a given
    # state, take the general path: the same numbers
    x, dy, first = cases[0]
    if dtype == np.float32:
        m.zero_grad()
        for a, b in zip(first, _fwd_bwd(m, x.astype(np.float64), dy)):
            np.testing.assert_array_equal(a, b)
    B = x.shape[0 if batch_first else 1]
    state = (np.zeros((1, B, 32), dtype), np.zeros((1, B, 32), dtype))
    m.zero_grad()
    for a, b in zip(first, _fwd_bwd(m, x, dy, state=state)):
        np.testing.assert_array_equal(a, b)


def test_split_plans_are_kept_for_the_last_few_shapes_only():
    from fastlstm.lstm import MAX_SPLIT_PLANS, _SplitPlan
    m = fastlstm.LSTM(16, 32, seed=0, threads=2)
    rng = np.random.default_rng(6)
    for T in range(50 + MAX_SPLIT_PLANS + 4, 50, -1):     # longest first: one workspace
        x = rng.standard_normal((T, 8, 16)).astype(np.float32)
        for _ in range(2):
            y = m.forward(x)[0].copy()
        np.testing.assert_array_equal(y, fastlstm.LSTM(16, 32, seed=0, threads=2).forward(x)[0])
    split = [k for k, p in m._plans.items() if type(p) is _SplitPlan]
    assert len(split) == MAX_SPLIT_PLANS and split[-1] == x.shape
