"""The column split (every core on one small batch, each owning a slice of the hidden
units; fastlstm._columns): an evaluation forward split this way against the NumPy
reference (float64), against the same layer on one thread, and bitwise against itself."""
import numpy as np
import pytest

import fastlstm
from fastlstm import reference
from fastlstm._columns import from_bfloat16, to_bfloat16, unit_ranges
from fastlstm._plans import ColumnPlan
from fastlstm._threads import column_parts, usable_cores

needs_two = pytest.mark.skipif(usable_cores() < 2, reason="the column split needs two cores")


def _ref_stack(m, x, h0, c0, lengths):
    """The reference, layer by layer (it is one layer); y past a length is 0."""
    out, hs, cs = x, [], []
    for k in range(m.num_layers):
        p = {n: m.params[f"{n}_l{k}"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        y, (h, c), _ = reference.forward(out, h0[k], c0[k], **p, cell_clip=m.cell_clip,
                                         lengths=lengths)
        out = y
        hs.append(h)
        cs.append(c)
    return out, np.stack(hs), np.stack(cs)


@pytest.mark.parametrize("T,B,I,H,L,n", [(6, 1, 5, 64, 1, 2), (9, 3, 7, 48, 2, 2),
                                         (5, 4, 16, 128, 3, 2), (4, 2, 8, 40, 1, 3),
                                         (7, 5, 6, 33, 2, 1), (3, 1, 4, 256, 2, 2),
                                         (40, 3, 8, 256, 2, 2)])     # packed products
def test_the_column_split_is_the_reference_in_float64(T, B, I, H, L, n):
    m = fastlstm.LSTM(I, H, num_layers=L, dtype=np.float64, seed=T, cell_clip=1.5).eval()
    rng = np.random.default_rng(B)
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((2, L, B, H))
    lengths = rng.integers(1, T + 1, B)
    plan = ColumnPlan(m._spec, m.flat_params, T, B, n)
    assert plan.panels == (T >= ColumnPlan.PANEL_STEPS)
    y, (h_n, c_n) = plan.forward(x, h0, c0, lengths)
    want_y, want_h, want_c = _ref_stack(m, x, h0, c0, lengths)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(h_n, want_h, rtol=0, atol=1e-10)
    np.testing.assert_allclose(c_n, want_c, rtol=0, atol=1e-10)
    again = ColumnPlan(m._spec, m.flat_params, T, B, n).forward(x, h0, c0, lengths)[0]
    assert np.array_equal(again, y)           # bitwise, for a given thread count


@needs_two
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, batch_first=True),
                                    dict(num_layers=3, bias=False, cell_clip=0.3),
                                    dict(recurrent_dropout=0.4, forget_bias=1.0)])
def test_an_evaluation_forward_splits_by_units_where_the_rule_says(config, dtype):
    B, T, H = 2, 11, 256
    assert column_parts(None, B, H) == 2 and column_parts(None, 8, H) == 1
    m = fastlstm.LSTM(10, H, dtype=dtype, seed=3, **config).eval()
    one = fastlstm.LSTM(10, H, dtype=dtype, seed=3, threads=1, **config).eval()
    rng = np.random.default_rng(0)
    shape = (B, T, 10) if m.batch_first else (T, B, 10)
    x = rng.standard_normal(shape).astype(dtype)
    state = tuple(rng.standard_normal((m.num_layers, B, H)).astype(dtype) for _ in range(2))
    tol = dict(rtol=0, atol=1e-12 if dtype == np.float64 else 2e-6)
    for kw in (dict(), dict(state=state, lengths=[T, 4])):
        y, (h, c) = m.forward(x, **kw)
        assert (T, B) in m._col_plans                   # it did split by units
        y1, (h1, c1) = one.forward(x, **kw)
        for got, want in ((y, y1), (h, h1), (c, c1)):
            np.testing.assert_allclose(got, want, **tol)
        last, _ = m.forward(x, return_sequences=False, **kw)
        np.testing.assert_allclose(last, one.forward(x, return_sequences=False, **kw)[0], **tol)
    with pytest.raises(RuntimeError, match="kept its activations"):
        m.backward(np.zeros_like(y))
    y_kept, _ = m.forward(x, keep=True)     # kept for a backward: the general path
    np.testing.assert_allclose(y_kept, one.forward(x)[0], **tol)
    m.backward(np.ones_like(y_kept))


def test_the_rule_and_the_unit_ranges():
    assert column_parts(None, 1, 128) == 1              # too small: one thread is faster
    assert column_parts(1, 1, 1024) == 1                # threads=1 is honoured
    assert column_parts(8, 1, 1024) <= usable_cores()   # never more than the cores
    for H, n in ((256, 2), (100, 3), (33, 2), (64, 4)):
        r = unit_ranges(H, n, 4)
        assert r[0][0] == 0 and r[-1][1] == H and all(a[1] == b[0] for a, b in zip(r, r[1:]))
        assert all(j0 % 16 == 0 for j0, _ in r)         # whole cache lines of h


def test_bfloat16_rounds_to_nearest_even():
    f = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -7 + 2 ** -9, -2.5e-3,
                  np.inf, -np.inf, 0.0, 3.0e38], np.float32)
    b = from_bfloat16(to_bfloat16(f))
    # halfway cases go to the even neighbour: 1 + 2^-8 -> 1; 1 + 3 * 2^-8 -> 1 + 2^-6
    assert b[0] == 1.0 and b[1] == 1.0 and b[2] == np.float32(1 + 2 ** -6)
    assert b[3] == np.float32(1 + 2 ** -7)              # below halfway: down
    assert np.isinf(b[5]) and b[5] > 0 and np.isinf(b[6]) and b[6] < 0 and b[7] == 0
    assert np.isnan(from_bfloat16(to_bfloat16(np.array([np.nan], np.float32))))[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32)
    rel = np.abs(from_bfloat16(to_bfloat16(x)) - x) / np.abs(x)
    assert rel.max() <= 2 ** -8                         # half an ulp of an 8-bit mantissa
    # exactly what rounding the float64 value to 8 significant bits gives
    m, e = np.frexp(x.astype(np.float64))
    want = np.ldexp(np.round(m * 2 ** 8) / 2 ** 8, e)   # np.round: half to even
    assert np.array_equal(from_bfloat16(to_bfloat16(x)), want.astype(np.float32))
