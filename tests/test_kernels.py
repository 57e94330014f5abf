"""The Numba kernels (through fastlstm.LSTM) against the NumPy reference."""
import numpy as np
import pytest

from helpers import RESULT_KEYS, TOL, random_problem, rel_err, run_fastlstm, run_reference

# T = 1, B = 1, H not a multiple of 8 or 16, I != H, I > H and I < H. The recurrent
# products run packed (_gemm) where 4H (forward) or H (backward) is a whole number of
# panels, 64 float32 or 32 float64 wide: H = 16 packs float32's and float64's forward,
# H = 32 float64's both directions and float32's forward, H = 64 both in both dtypes;
# B = 6 and 7 leave 2 and 3 rows past the micro-kernel's blocks of 4; T * B = 200 takes
# the weight gradients (_gemm.gradient_product) past one block of rows; T = 80 at H = 64
# runs the backward's row-wise products in two (float32) or three (float64) chunks of
# steps (_recurrence.CHUNK_BYTES), I = 16 its dx through _gemm.narrow_product.
SHAPES = [(1, 1, 1, 1), (1, 4, 3, 5), (7, 1, 2, 3), (3, 2, 2, 3), (10, 5, 13, 7),
          (4, 3, 20, 9), (6, 8, 16, 32), (25, 3, 5, 17), (4, 7, 5, 16), (5, 6, 8, 64),
          (3, 1, 4, 64), (40, 5, 6, 16), (80, 4, 16, 64)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_kernels_match_reference(shape, dtype):
    # The reference runs in float64 on the same (rounded) inputs: the float32
    # kernels are graded against exact-as-possible maths, not float32 numpy.
    prob = random_problem(3, *shape, dtype)
    prob64 = {k: ({n: a.astype(np.float64) for n, a in v.items()} if isinstance(v, dict)
                  else v.astype(np.float64)) for k, v in prob.items()}
    got, want = run_fastlstm(prob, dtype), run_reference(prob64)
    for k in RESULT_KEYS:
        assert got[k].dtype == dtype, k
        assert rel_err(got[k], want[k]) <= TOL[dtype], k


def test_state_defaults_to_zeros():
    import fastlstm
    prob = random_problem(4, 5, 3, 2, 4, np.float64)
    m = fastlstm.LSTM(2, 4, dtype=np.float64)
    m.load_state_dict(prob["params"])
    y1 = m.forward(prob["x"])[0].copy()
    zeros = np.zeros((1, 3, 4))
    y2 = m.forward(prob["x"], (zeros, zeros))[0].copy()
    assert np.array_equal(y1, y2)


def test_gradients_accumulate_and_zero_grad_clears():
    import fastlstm
    prob = random_problem(5, 4, 2, 3, 3, np.float64)
    m = fastlstm.LSTM(3, 3, dtype=np.float64)
    m.load_state_dict(prob["params"])
    m.forward(prob["x"])
    m.backward(prob["dy"])
    once = m.flat_grads.copy()
    m.forward(prob["x"])
    m.backward(prob["dy"])
    np.testing.assert_allclose(m.flat_grads, 2 * once, rtol=1e-14)
    m.zero_grad()
    assert not m.flat_grads.any()


def test_exact_activation_switch(monkeypatch):
    """FASTLSTM_EXACT_ACTIVATIONS=1 selects libm; both paths agree closely."""
    import fastlstm
    prob = random_problem(6, 5, 3, 4, 6, np.float64)
    fast = run_fastlstm(prob, np.float64)
    monkeypatch.setenv("FASTLSTM_EXACT_ACTIVATIONS", "1")
    exact = run_fastlstm(prob, np.float64)
    assert fastlstm.LSTM(1, 1)._exact
    for k in RESULT_KEYS:
        assert rel_err(fast[k], exact[k]) <= 1e-13


def test_state_carried_between_chunks_equals_one_pass():
    """Passing the returned (h_n, c_n) views straight back in (they alias the
    workspace that the next call overwrites) continues the sequence exactly."""
    import fastlstm
    prob = random_problem(8, 12, 3, 4, 5, np.float64)
    m = fastlstm.LSTM(4, 5, dtype=np.float64)
    m.load_state_dict(prob["params"])
    y_full = m.forward(prob["x"])[0].copy()
    state, parts = None, []
    for k in range(0, 12, 5):
        y, state = m.forward(prob["x"][k:k + 5], state)
        parts.append(y.copy())
    np.testing.assert_allclose(np.concatenate(parts), y_full, rtol=0, atol=1e-15)
    # read-only outputs are accepted as inputs, e.g. y as dy
    y, _ = m.forward(prob["x"])
    m.backward(y)


@pytest.mark.parametrize("flags", [(True, False, False, False, False, False),
                                   (False, True, True, False, True, False),
                                   (True, True, False, True, False, True),
                                   (True, False, True, True, True, True)])
def test_numba_and_python_carve_the_layout_alike(flags):
    """The kernels' carving (compiled from _layout's tables) and Python's views of
    the same flat buffers: the same names, offsets and shapes, with every option."""
    from fastlstm import _layout
    from fastlstm._kernels import opts_bits, param_views, workspace_views
    bias, proj, peephole, layer_norm, zoneout, rdrop = flags
    opts = opts_bits(**dict(zip(_layout.FLAGS, flags)), exact=True)   # a call bit as well
    pflags, wflags = (bias, proj, peephole, layer_norm), (layer_norm, zoneout, rdrop)
    T, B, I, H = 3, 2, 4, 5
    P = 2 if proj else H

    def offsets(views, base):
        return {k: (v.__array_interface__["data"][0] - base, v.shape) for k, v in views.items()}

    for flat, numba, python in (
            (np.zeros(_layout.param_size(I, H, P, *pflags)),
             lambda a: param_views(a, I, H, P, opts),
             _layout.param_table(I, H, P, *pflags)),
            (np.zeros(_layout.workspace_size(T, B, I, H, P, *wflags)),
             lambda a: workspace_views(a, T, B, I, H, P, opts),
             _layout.workspace_table(T, B, I, H, P, *wflags))):
        base = flat.__array_interface__["data"][0]
        ours = numba(flat)._asdict()
        theirs = _layout.carve(flat, python)
        assert {k: v for k, v in offsets(ours, base).items() if k in theirs} == \
            offsets(theirs, base)
        assert all(ours[k].size == 0 for k in ours if k not in theirs)   # absent: empty


def test_subnormals_are_flushed_inside_and_the_callers_setting_kept():
    """A gradient carried back over many steps from the last one decays into subnormals,
    which cost ~100 cycles per operation: the kernels flush them to zero, and give the
    calling thread its floating-point setting back."""
    from fastlstm import LSTM
    T, B, I, H = 400, 2, 3, 8
    m = LSTM(I, H, seed=0, threads=1)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    dy = np.zeros((T, B, H), np.float32)
    dy[-1] = 1
    m.forward(x)
    dx = m.backward(dy)[0]
    tiny = np.finfo(np.float32).tiny
    assert not ((dx != 0) & (np.abs(dx) < tiny)).any(), "a subnormal left the kernel"
    assert (dx[-1] != 0).all()
    a = np.full(3, 1e-36, np.float32)
    assert (a * np.float32(1e-3) != 0).all(), "the caller's thread still flushes subnormals"
