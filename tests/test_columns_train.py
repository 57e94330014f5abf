"""The column split in training (fastlstm._columns_train): a forward that keeps its
activations and its backward, each thread owning a slice of the hidden units, against
the NumPy reference (float64), against the same layer on one thread (the batch split's
kernels), and bitwise against itself."""
import numpy as np
import pytest

import fastlstm
from fastlstm import _threads, reference
from fastlstm._plans import ColumnTrainPlan
from fastlstm._threads import train_column_parts, usable_cores

needs_two = pytest.mark.skipif(usable_cores() < 2, reason="the column split needs two cores")


@pytest.mark.parametrize("T,B,I,H,n,bias,clip", [(6, 1, 5, 64, 2, True, None),
                                                 (9, 3, 7, 128, 2, False, 0.4),
                                                 (4, 2, 8, 64, 3, True, 1.5),
                                                 (3, 5, 16, 256, 2, True, None)])
def test_the_training_column_split_is_the_reference_in_float64(T, B, I, H, n, bias, clip):
    m = fastlstm.LSTM(I, H, bias=bias, dtype=np.float64, seed=T, cell_clip=clip).train()
    rng = np.random.default_rng(B)
    m.flat_params[:] += 0.2 * rng.standard_normal(m.flat_params.size)
    x, dy = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    h0, c0, dh_n, dc_n = rng.standard_normal((4, 1, B, H))
    assert ColumnTrainPlan.fits(m._spec, n)
    plan = ColumnTrainPlan(m._spec, T, B, n)
    y, (h_n, c_n) = plan.forward(x, h0, c0)
    p = {k: m.params[f"{k}_l0"] if bias or not k.startswith("bias") else np.zeros(4 * H)
         for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    want_y, (want_h, want_c), cache = reference.forward(x, h0[0], c0[0], **p, cell_clip=clip)
    for got, want in ((y, want_y), (h_n[0], want_h), (c_n[0], want_c)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    m.zero_grad()
    dx, (dh0, dc0) = plan.backward(dy, dh_n, dc_n)
    want_dx, (want_dh0, want_dc0), g = reference.backward(dy, dh_n[0], dc_n[0], cache)
    for got, want in ((dx, want_dx), (dh0[0], want_dh0), (dc0[0], want_dc0),
                      (m.grads["weight_ih_l0"], g["weight_ih"]),
                      (m.grads["weight_hh_l0"], g["weight_hh"])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    if bias:
        for name in ("bias_ih", "bias_hh"):
            np.testing.assert_allclose(m.grads[f"{name}_l0"], g[name], rtol=0, atol=1e-10)
    first = (y.copy(), dx.copy(), m.flat_grads.copy())
    m.zero_grad()
    y, _ = plan.forward(x, h0, c0)
    dx, _ = plan.backward(dy, dh_n, dc_n)
    for got, want in zip((y, dx, m.flat_grads), first):
        assert np.array_equal(got, want)       # bitwise, for a given thread count


def test_the_rule_is_bytes_of_w_hh_per_sequence():
    kib = _threads.TRAIN_COLUMN_BYTES // 1024
    assert kib == 128
    # 4 H^2 float32 bytes per sequence: H = 256 -> 1 MiB over B
    assert train_column_parts(2, 8, 256, 4) == min(2, usable_cores())
    assert train_column_parts(2, 9, 256, 4) == 1
    assert train_column_parts(2, 16, 256, 8) == min(2, usable_cores())
    assert train_column_parts(1, 1, 2048, 4) == 1          # one thread allowed


@needs_two
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("B,H,config", [(1, 128, dict()), (4, 256, dict(batch_first=True)),
                                        (2, 192, dict(bias=False, cell_clip=0.5)),
                                        (8, 256, dict(forget_bias=1.0)),
                                        (2, 128, dict(num_layers=2)),
                                        (2, 256, dict(num_layers=3, dropout=0.4,
                                                      batch_first=True))])
def test_training_splits_by_units_where_the_rule_says(B, H, config, dtype):
    T, I, L = 7, 12, config.get("num_layers", 1)
    m = fastlstm.LSTM(I, H, dtype=dtype, seed=5, threads=2, **config).train()
    one = fastlstm.LSTM(I, H, dtype=dtype, seed=5, threads=1, **config).train()
    assert m._train_columns(T, B) == 2 and one._train_columns(T, B) == 1
    rng = np.random.default_rng(H)
    shape = (B, T, I) if config.get("batch_first") else (T, B, I)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    for _ in range(3):      # the first call makes the plan, the next take it; grads add up
        x = rng.standard_normal(shape).astype(dtype)
        state = tuple(rng.standard_normal((2, L, B, H)).astype(dtype))
        dy = rng.standard_normal(shape[:2] + (H,)).astype(dtype)
        dstate = tuple(rng.standard_normal((2, L, B, H)).astype(dtype))
        for st, ds in ((None, None), (state, dstate)):
            y, (h, c) = m.forward(x, state=st)
            y1, (h1, c1) = one.forward(x, state=st)
            assert type(m._last) is ColumnTrainPlan
            if config.get("dropout"):       # the same masks, drawn whole from one seed
                for a, b in zip(m.last_masks["dropout"], one.last_masks["dropout"]):
                    assert a is None and b is None or np.array_equal(a, b)
            for got, want in ((y, y1), (h, h1), (c, c1)):
                np.testing.assert_allclose(got, want, rtol=0, atol=tol)
            dx, (dh0, dc0) = m.backward(dy, dstate=ds)
            dx1, (dh01, dc01) = one.backward(dy, dstate=ds)
            for got, want in ((dx, dx1), (dh0, dh01), (dc0, dc01),
                              (m.flat_grads, one.flat_grads)):
                np.testing.assert_allclose(got, want, rtol=0, atol=tol * 10)


@needs_two
def test_past_the_rule_training_splits_the_batch():
    m = fastlstm.LSTM(8, 64, threads=2).train()
    x = np.zeros((5, 16, 8), np.float32)      # 64 KiB of W_hh per sequence
    m.forward(x)
    assert type(m._last) is not ColumnTrainPlan
    for config in (dict(bidirectional=True), dict(proj_size=64), dict(peephole=True),
                   dict(recurrent_dropout=0.2)):
        m = fastlstm.LSTM(8, 256, threads=2, **config).train()
        m.forward(np.zeros((5, 1, 8), np.float32))
        assert type(m._last) is not ColumnTrainPlan
    m.forward(np.zeros((5, 1, 8), np.float32), lengths=np.array([3]))
    assert type(m._last) is not ColumnTrainPlan


@needs_two
def test_a_column_split_backward_checks_dy_and_changes_nothing_on_bad_input():
    m = fastlstm.LSTM(8, 256, threads=2).train()
    x = np.ones((5, 2, 8), np.float32)
    m.forward(x)
    assert type(m._last) is ColumnTrainPlan
    before = m.flat_grads.copy()
    with pytest.raises(ValueError, match="dy"):
        m.backward(np.zeros((5, 3, 256), np.float32))
    with pytest.raises(ValueError, match="dstate"):
        m.backward(np.zeros((5, 2, 256), np.float32),
                   dstate=(np.zeros((1, 2, 255), np.float32),) * 2)
    assert np.array_equal(m.flat_grads, before)
    m.backward(np.zeros((5, 2, 256), np.float32))


@needs_two
def test_a_plan_made_in_evaluation_does_not_skip_training_masks():
    """A column plan made by an evaluation forward that kept its activations draws no
    masks; the same shape in training mode must still get recurrent dropout and dropout."""
    x = np.random.default_rng(0).standard_normal((6, 2, 8))
    for config in (dict(recurrent_dropout=0.3), dict(num_layers=2, dropout=0.5)):
        m, one = (fastlstm.LSTM(8, 256, dtype=np.float64, seed=1, threads=t, **config)
                  for t in (2, 1))
        for model in (m, one):
            model.eval()
            model.forward(x, keep=True)
            model.train()
        y, _ = m.forward(x)
        np.testing.assert_allclose(y, one.forward(x)[0], rtol=0, atol=1e-10)
