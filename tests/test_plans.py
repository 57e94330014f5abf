"""Plans: a model called again at a shape it has run takes a plan (fastlstm._plans),
built on the first call; its results equal the general path's, bitwise."""
import numpy as np
import pytest

import fastlstm


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
    ref._fast_paths = False                            # ref always takes the general path
    for x in (small, small, big, small, small):       # the big call grows the workspace
        dy = np.ones(x.shape[:2] + (3,))
        m.zero_grad()
        ref.zero_grad()
        got, want = _fwd_bwd(m, x, dy), _fwd_bwd(ref, x, dy)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
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
    """A repeated split call (_plans.SplitPlan: part 0 here, part 1 on a server thread
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
    assert kinds == ["SplitPlan", "SplitPlan", "Plan"]
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
    from fastlstm._plans import MAX_SPLIT_PLANS, SplitPlan
    m = fastlstm.LSTM(16, 32, seed=0, threads=2)
    rng = np.random.default_rng(6)
    for T in range(50 + MAX_SPLIT_PLANS + 4, 50, -1):     # longest first: one workspace
        x = rng.standard_normal((T, 8, 16)).astype(np.float32)
        for _ in range(2):
            y = m.forward(x)[0].copy()
        np.testing.assert_array_equal(y, fastlstm.LSTM(16, 32, seed=0, threads=2).forward(x)[0])
    split = [k for k, p in m._plans.items() if type(p) is SplitPlan]
    assert len(split) == MAX_SPLIT_PLANS and split[-1] == x.shape
