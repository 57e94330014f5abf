"""fastlstm.Inference: whole sequences in evaluation mode and live streams, one step at
a time, against the layer's own forward (the same kernels: bitwise) and predict."""
import threading
import tracemalloc

import numpy as np
import pytest

import fastlstm

CONFIGS = [dict(), dict(num_layers=2, proj_size=16), dict(num_layers=3, proj_size=32),
           dict(peephole=True, layer_norm=True, zoneout=0.2, zoneout_cell=0.1),
           dict(recurrent_dropout=0.3, dropout=0.2, num_layers=2, cell_clip=0.5)]


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


def test_a_step_allocates_no_array():
    s = fastlstm.Inference(fastlstm.LSTM(32, 64, seed=0)).stream(1)
    x = np.ones((1, 32), np.float32)
    for _ in range(10):
        s.step(x)
    tracemalloc.start()
    try:
        for _ in range(200):
            s.step(x)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2000, peak


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
