"""fastlstm.Inference: whole sequences in evaluation mode and live streams, one step at
a time, against the layer's own forward (the same kernels: bitwise) and predict."""
import gc
import threading
import tracemalloc

import numpy as np
import pytest

import fastlstm

CONFIGS = [dict(), dict(num_layers=2, proj_size=16), dict(num_layers=3, proj_size=32),
           dict(peephole=True, layer_norm=True, zoneout=0.2, zoneout_cell=0.1),
           dict(recurrent_dropout=0.3, dropout=0.2, num_layers=2, cell_clip=0.5),
           # plain layers: a stream step runs their maths alone (_kernels._plain_step)
           dict(num_layers=2, cell_clip=0.5), dict(bias=False)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_a_stream_of_T_steps_is_the_forward_over_them_bitwise(config, dtype):
    m = fastlstm.LSTM(12, 64, seed=config, dtype=dtype, threads=1, **CONFIGS[config])
    inf = fastlstm.Inference(m)
    rng = np.random.default_rng(config)
    x = rng.standard_normal((40, 3, 12)).astype(dtype)
    h0 = rng.standard_normal((m.num_layers, 3, m.output_size)).astype(dtype)
    c0 = rng.standard_normal((m.num_layers, 3, 64)).astype(dtype)
    y, (h_n, c_n) = inf.forward(x, state=(h0, c0))
    y, h_n, c_n = (np.array(a) for a in (y, h_n, c_n))
    s = inf.stream(3)
    s.state = (h0, c0)
    steps = np.stack([np.array(s.step(x[t])) for t in range(40)])
    assert np.array_equal(steps, y)
    h, c = s.state
    assert np.array_equal(h, h_n) and np.array_equal(c, c_n)
    want = m.eval().forward(x, state=(h0, c0))[0]      # the model itself, evaluation mode
    assert np.array_equal(want, y)


def test_a_step_reads_x_t_of_any_layout_as_its_values():
    """The compiled step is called without Numba's dispatcher (no type checks): an x_t
    that is not exactly a writable, aligned, C-contiguous array of the model's dtype
    must be copied into the stream's own buffer, never read as if it were one."""
    m = fastlstm.LSTM(12, 64, num_layers=2, seed=0, threads=1)
    inf = fastlstm.Inference(m)
    x = np.random.default_rng(0).standard_normal((8, 3, 12)).astype(np.float32)
    ro = x.copy()
    ro.flags.writeable = False
    wide = np.zeros((8, 3, 24), np.float32)
    wide[..., ::2] = x
    unaligned = np.frombuffer(b"\0" + x.tobytes(), np.float32, x.size, 1).reshape(x.shape)
    layouts = [lambda t: x[t].astype(np.float64), lambda t: ro[t],
               lambda t: wide[t, :, ::2], lambda t: np.asfortranarray(x[t]),
               lambda t: unaligned[t], lambda t: x[t].view(x.dtype.newbyteorder("S")
                                                          ).byteswap()]
    a, b = inf.stream(3), inf.stream(3)
    for t in range(8):
        want = np.array(a.step(x[t]))
        got = np.array(b.step(layouts[t % len(layouts)](t)))
        assert np.array_equal(got, want), t


def test_a_sequence_model_streams_its_head_and_forwards_predict():
    rng = np.random.default_rng(0)
    for loss, out in (("mse", 2), ("bce", 1), ("ce", 4)):
        model = fastlstm.SequenceModel(5, 16, out, loss=loss, seed=1, threads=1)
        inf = fastlstm.Inference(model)
        x = rng.standard_normal((4, 30, 5)).astype(np.float32)
        assert np.array_equal(inf.forward(x), model.predict(x))
        s = inf.stream(4)
        for t in range(30):
            p = s.step(x[:, t])
        np.testing.assert_allclose(p, model.predict(x), rtol=1e-5, atol=1e-6)


def test_state_reset_and_refresh():
    m = fastlstm.LSTM(3, 8, seed=0, dtype=np.float64, threads=1)
    inf = fastlstm.Inference(m)
    x = np.random.default_rng(1).standard_normal((10, 2, 3))
    s = inf.stream(2)
    for t in range(10):
        s.step(x[t])
    s.reset(rows=[1])
    h, c = s.state
    assert h[:, 0].any() and not h[:, 1].any() and not c[:, 1].any()
    fresh = inf.stream(2)
    s.reset()
    for t in range(3):
        assert np.array_equal(s.step(x[t]), fresh.step(x[t]))
    old = np.array(inf.stream(2).step(x[0]))
    m.flat_params *= 0.5                      # "training" moved the model's weights:
    assert np.array_equal(inf.stream(2).step(x[0]), old)     # not the copy's
    inf.refresh()                             # copied again; the streams pack them again
    s.reset()
    new = np.array(s.step(x[0]))
    assert not np.array_equal(new, old)
    assert np.array_equal(new, np.array(inf.forward(x[:1])[0][0]))


@pytest.mark.parametrize("T, B", [(40, 2), (5, 1)])
def test_a_forward_packs_the_weights_once_until_refresh(T, B):
    """Inference's copy of the weights changes only in refresh(): its column plans pack
    W_hh into panels on the first forward and use them again after, until refresh()
    (and so pack at B = 1 and over few steps too, where the model's own forward, which
    packs every call, does not: it sums in another order there)."""
    m = fastlstm.LSTM(16, 256, num_layers=2, seed=0, threads=2)
    inf = fastlstm.Inference(m)
    x = np.random.default_rng(3).standard_normal((T, B, 16)).astype(np.float32)
    first = np.array(inf.forward(x)[0])
    plan = inf._lstm._col_plans[(T, B)]
    assert plan.n == 2 and plan.panels and plan.packed == inf._generation
    assert np.array_equal(inf.forward(x)[0], first)          # from the panels kept
    np.testing.assert_allclose(m.eval().forward(x)[0], first, rtol=0, atol=1e-6)
    m.flat_params *= 0.5
    inf.refresh()
    assert plan.packed != inf._generation
    again = np.array(inf.forward(x)[0])
    np.testing.assert_allclose(again, m.forward(x)[0], rtol=0, atol=1e-6)
    assert np.abs(again - first).max() > 1e-3
    m.flat_params *= 2
    inf.refresh()
    assert np.array_equal(inf.forward(x)[0], first)          # packed again: the same


@pytest.mark.parametrize("H, weights", [(64, "float32"), (256, "float32"), (64, "bfloat16")],
                         ids=["one-thread", "split-by-units", "bfloat16"])
def test_a_step_allocates_no_array(H, weights):
    s = fastlstm.Inference(fastlstm.LSTM(32, H, seed=0), weights=weights).stream(1)
    x = np.ones((1, 32), np.float32)
    for _ in range(10):
        s.step(x)
    # No collection meanwhile: in a process holding the whole suite's objects a full
    # collection stalls this thread for milliseconds, and a split step's server, idle
    # that long, goes to sleep and re-enters its job in Python when woken (CI saw a
    # 2.3 KB peak from that once; 952 bytes without). The machine's other load can
    # stall it as well (CI again, with gc off): the least peak of three trials, which a
    # step that allocates raises in every one.
    peaks = []
    for _ in range(3):
        gc.disable()
        tracemalloc.start()
        try:
            for _ in range(200):
                s.step(x)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
            gc.enable()
    assert min(peaks) < 2000, peaks


def test_bad_input_to_inference_and_streams():
    m = fastlstm.LSTM(3, 8, seed=0)
    with pytest.raises(ValueError, match=r"weights must be one of \('float32', 'bfloat16'\)"):
        fastlstm.Inference(m, weights="float16")
    with pytest.raises(TypeError, match="model must be a fastlstm.LSTM"):
        fastlstm.Inference(object())
    with pytest.raises(ValueError, match="stream.. needs a one-direction model"):
        fastlstm.Inference(fastlstm.LSTM(3, 8, bidirectional=True)).stream(1)
    s = fastlstm.Inference(m).stream(2)
    s.step(np.ones((2, 3), np.float32))
    before = s.state
    for bad, err, msg in ((np.ones((1, 3), np.float32), ValueError, r"batch_size=2"),
                          (np.ones((2, 4), np.float32), ValueError, r"input_size=3"),
                          (np.ones((2, 3), np.int64), TypeError, "floating dtype"),
                          ([[1.0] * 3] * 2, TypeError, "numpy.ndarray")):
        with pytest.raises(err, match=msg):
            s.step(bad)
    with pytest.raises(ValueError, match="state.0. .h. must have shape"):
        s.state = (np.zeros((1, 3, 8), np.float32), np.zeros((1, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        s.reset(rows=[5])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fastlstm.Inference(m).stream(0)
    after = s.state
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    busy, release = threading.Event(), threading.Event()

    def hold():
        with m._guard("forward"):
            busy.set()
            release.wait(10)
    t = threading.Thread(target=hold)
    t.start()
    busy.wait(10)
    try:
        with pytest.raises(RuntimeError, match="another thread"):
            fastlstm.Inference(m)
    finally:
        release.set()
        t.join()


def _digits():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = (d.images / 16.0).astype(np.float32)            # (N, 8 rows, 8): a row per step
    return x[:1400], d.target[:1400], x[1400:], d.target[1400:]


def test_bfloat16_weights_stay_within_1e2_and_keep_a_real_sets_accuracy():
    x, y, xt, yt = _digits()
    model = fastlstm.SequenceModel(8, 64, 10, loss="ce", seed=0)
    model.fit(x, y, fastlstm.Adam(model, lr=1e-2), epochs=8, batch_size=64,
              progress=False)
    f32 = np.array(fastlstm.Inference(model).forward(xt))
    bf16 = np.array(fastlstm.Inference(model, weights="bfloat16").forward(xt))
    right32, right16 = (int(np.sum(p.argmax(1) == yt)) for p in (f32, bf16))
    assert right32 > 0.8 * len(yt)                       # it learned
    assert abs(right16 - right32) <= 1                   # at most one of 397 changes
    lstm = fastlstm.LSTM(32, 256, num_layers=2, seed=1)
    inp = np.random.default_rng(0).standard_normal((25, 2, 32)).astype(np.float32)
    want = np.array(fastlstm.Inference(lstm).forward(inp)[0])
    got = np.array(fastlstm.Inference(lstm, weights="bfloat16").forward(inp)[0])
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
    assert not np.array_equal(got, want)                 # the bfloat16 weights were used


@pytest.mark.parametrize("T, B", [(1, 3), (25, 2), (300, 4)])
def test_bfloat16_weights_are_float32_maths_on_the_rounded_weights(T, B):
    """Both ways of the input product (row dot products up to 2 H rows, T B = 3 and
    50; widened blocks and BLAS above, 1200) compute with the rounded weights."""
    from fastlstm._columns import from_bfloat16, to_bfloat16
    m = fastlstm.LSTM(16, 64, num_layers=2, seed=3)
    rounded = fastlstm.LSTM(16, 64, num_layers=2, seed=3)
    rounded.load_state_dict({k: from_bfloat16(to_bfloat16(v)).reshape(v.shape)
                             if k.startswith("weight") else v
                             for k, v in m.state_dict().items()})   # the biases stay
    x = np.random.default_rng(T).standard_normal((T, B, 16)).astype(np.float32)
    got = np.array(fastlstm.Inference(m, weights="bfloat16").forward(x)[0])
    want = np.array(fastlstm.Inference(rounded).forward(x)[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_bfloat16_refresh_and_streams_and_refusals():
    m = fastlstm.LSTM(16, 64, num_layers=2, seed=0)
    inf = fastlstm.Inference(m, weights="bfloat16")
    x = np.random.default_rng(1).standard_normal((12, 3, 16)).astype(np.float32)
    y = np.array(inf.forward(x)[0])
    s = inf.stream(3)
    steps = np.stack([np.array(s.step(x[t])) for t in range(12)])
    np.testing.assert_allclose(steps, y, rtol=0, atol=1e-6)   # same weights, same maths
    m.flat_params *= 0.5                                 # more training
    assert np.array_equal(inf.forward(x)[0], y)          # a copy: unchanged until refresh
    inf.refresh()
    assert not np.allclose(inf.forward(x)[0], y)
    for bad, what in ((fastlstm.LSTM(4, 8, dtype=np.float64), "dtype=float64"),
                      (fastlstm.LSTM(4, 8, proj_size=4), "proj_size=4"),
                      (fastlstm.LSTM(4, 8, peephole=True), "peephole=True"),
                      (fastlstm.LSTM(4, 8, bidirectional=True), "bidirectional=True")):
        with pytest.raises(ValueError, match=what):
            fastlstm.Inference(bad, weights="bfloat16")


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_a_stream_split_by_units_is_the_forward(weights):
    """Where the hidden units are split over the cores (H = 256, B = 1) a stream gives
    the whole-sequence forward's outputs: bitwise is the one-thread path's (above); here
    the forward's input product over all steps is one BLAS call, the stream's one row,
    which BLAS may sum in another order."""
    m = fastlstm.LSTM(24, 256, num_layers=2, seed=0)
    inf = fastlstm.Inference(m, weights=weights)
    s = inf.stream(1)
    x = np.random.default_rng(2).standard_normal((30, 1, 24)).astype(np.float32)
    y, (h_n, c_n) = inf.forward(x)
    y, h_n, c_n = np.array(y), np.array(h_n), np.array(c_n)
    steps = np.stack([np.array(s.step(x[t])) for t in range(30)])
    np.testing.assert_allclose(steps, y, rtol=0, atol=2e-6)
    h, c = s.state
    np.testing.assert_allclose(h, h_n, rtol=0, atol=2e-6)
    np.testing.assert_allclose(c, c_n, rtol=0, atol=2e-6)
    s.reset(rows=[0])
    assert not s.state[0].any() and not s.state[1].any()
    before = s.state
    with pytest.raises(ValueError, match="batch_size=1"):
        s.step(np.ones((2, 24), np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(before, s.state))
