"""Bad input: a clear error naming the argument, and nothing changed."""
import numpy as np
import pytest

import fastlstm

T, B, I, H = 4, 3, 2, 5


@pytest.fixture
def model():
    m = fastlstm.LSTM(I, H, dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    m.forward(rng.standard_normal((T, B, I)))
    m.backward(rng.standard_normal((T, B, H)))
    return m


def snapshot(m, *arrays):
    return (m.flat_params.copy(), m.flat_grads.copy(), m._last, [a.copy() for a in arrays])


def assert_unchanged(m, snap, *arrays):
    params, grads, last, copies = snap
    assert np.array_equal(m.flat_params, params)
    assert np.array_equal(m.flat_grads, grads)
    assert m._last == last
    for a, c in zip(arrays, copies):
        assert np.array_equal(a, c, equal_nan=True)


def a(*shape, dtype=np.float64):
    return np.ones(shape, dtype)


FORWARD_CASES = {
    "x-2d": (dict(x=a(T, I)), ValueError, r"x must have shape \(T, B, 2\), got \(4, 2\)"),
    "x-4d": (dict(x=a(T, B, I, 1)), ValueError, r"x must have shape \(T, B, 2\), got \(4, 3, 2, 1\)"),
    "x-features": (dict(x=a(T, B, I + 1)), ValueError, r"x must have shape \(T, B, 2\), got \(4, 3, 3\)"),
    "x-T0": (dict(x=a(0, B, I)), ValueError, r"x must have T >= 1 and B >= 1, got shape \(0, 3, 2\)"),
    "x-B0": (dict(x=a(T, 0, I)), ValueError, r"x must have T >= 1 and B >= 1, got shape \(4, 0, 2\)"),
    "x-list": (dict(x=[[[1.0, 2.0]]]), TypeError, r"x must be a numpy.ndarray, got list"),
    "x-int": (dict(x=a(T, B, I, dtype=np.int64)), TypeError, r"x must have a floating dtype.*got dtype int64"),
    "x-bool": (dict(x=a(T, B, I, dtype=bool)), TypeError, r"x must have a floating dtype.*got dtype bool"),
    "x-complex": (dict(x=a(T, B, I, dtype=complex)), TypeError, r"got dtype complex128"),
    "state-not-pair": (dict(x=a(T, B, I), state=a(1, B, H)), TypeError, r"state must be a tuple \(h, c\)"),
    "state-3": (dict(x=a(T, B, I), state=(a(1, B, H),) * 3), TypeError, r"state must be a tuple.*length 3"),
    "h0-2d": (dict(x=a(T, B, I), state=(a(B, H), a(1, B, H))), ValueError,
              r"state\[0\] \(h\) must have shape \(1, 3, 5\), got \(3, 5\)"),
    "c0-batch": (dict(x=a(T, B, I), state=(a(1, B, H), a(1, B + 1, H))), ValueError,
                 r"state\[1\] \(c\) must have shape \(1, 3, 5\), got \(1, 4, 5\)"),
    "c0-int": (dict(x=a(T, B, I), state=(a(1, B, H), a(1, B, H, dtype=np.int32))), TypeError,
               r"state\[1\] \(c\) must have a floating dtype"),
}


@pytest.mark.parametrize("case", FORWARD_CASES, ids=list(FORWARD_CASES))
def test_forward_bad_input(model, case):
    kwargs, exc, msg = FORWARD_CASES[case]
    arrays = [v for v in kwargs.values() if isinstance(v, np.ndarray)]
    arrays += [s for v in kwargs.values() if isinstance(v, tuple) for s in v]
    snap = snapshot(model, *arrays)
    with pytest.raises(exc, match=msg):
        model.forward(**kwargs)
    assert_unchanged(model, snap, *arrays)


BACKWARD_CASES = {
    "dy-T": (dict(dy=a(T + 1, B, H)), ValueError, r"dy must have shape \(4, 3, 5\), got \(5, 3, 5\)"),
    "dy-B": (dict(dy=a(T, B - 1, H)), ValueError, r"dy must have shape \(4, 3, 5\), got \(4, 2, 5\)"),
    "dy-2d": (dict(dy=a(T, H)), ValueError, r"dy must have shape \(4, 3, 5\)"),
    "dy-int": (dict(dy=a(T, B, H, dtype=np.int8)), TypeError, r"dy must have a floating dtype"),
    "dy-none": (dict(dy=None), TypeError, r"dy must be a numpy.ndarray, got NoneType"),
    "dh-shape": (dict(dy=a(T, B, H), dstate=(a(1, B, H + 1), a(1, B, H))), ValueError,
                 r"dstate\[0\] \(h\) must have shape \(1, 3, 5\), got \(1, 3, 6\)"),
    "dstate-array": (dict(dy=a(T, B, H), dstate=a(2, B, H)), TypeError, r"dstate must be a tuple"),
}


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=list(BACKWARD_CASES))
def test_backward_bad_input(model, case):
    kwargs, exc, msg = BACKWARD_CASES[case]
    arrays = [v for v in kwargs.values() if isinstance(v, np.ndarray)]
    snap = snapshot(model, *arrays)
    with pytest.raises(exc, match=msg):
        model.backward(**kwargs)
    assert_unchanged(model, snap, *arrays)


def test_backward_without_forward():
    m = fastlstm.LSTM(I, H)
    snap = snapshot(m)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) first"):
        m.backward(a(T, B, H, dtype=np.float32))
    assert_unchanged(m, snap)


def test_failed_forward_keeps_previous_activations(model):
    """backward after a failed forward still differentiates the last good forward."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, H))
    model.zero_grad()
    model.forward(x)
    dx1 = model.backward(dy)[0].copy()
    with pytest.raises(ValueError):
        model.forward(a(T + 10, B + 10, I + 1))   # would also have grown the workspace
    dx2 = model.backward(dy)[0].copy()
    assert np.array_equal(dx1, dx2)


LOAD_CASES = {
    "missing": (lambda d: d.pop("bias_hh_l0"), KeyError, r"missing \['bias_hh_l0'\]"),
    "unexpected": (lambda d: d.__setitem__("weight_hr_l0", a(5, 5)), KeyError,
                   r"unexpected keys \['weight_hr_l0'\]"),
    "shape": (lambda d: d.__setitem__("weight_hh_l0", a(4 * H, H + 1)), ValueError,
              r"state_dict\['weight_hh_l0'\] must have shape \(20, 5\), got \(20, 6\)"),
    "bias-shape": (lambda d: d.__setitem__("bias_ih_l0", a(4 * H, 1)), ValueError,
                   r"state_dict\['bias_ih_l0'\] must have shape \(20,\), got \(20, 1\)"),
    "int": (lambda d: d.__setitem__("weight_ih_l0", a(4 * H, I, dtype=np.int64)), TypeError,
            r"state_dict\['weight_ih_l0'\] must have a floating dtype"),
    "list": (lambda d: d.__setitem__("bias_hh_l0", [0.0] * (4 * H)), TypeError,
             r"state_dict\['bias_hh_l0'\] must be a numpy.ndarray, got list"),
    "variant-keys": (lambda d: d.update(weight_ci_l0=a(H), weight_cf_l0=a(H), weight_co_l0=a(H)),
                     KeyError, r"unexpected keys \['weight_cf_l0', 'weight_ci_l0', "
                     r"'weight_co_l0'\] .*; they belong to a model with peephole=True"),
}


@pytest.mark.parametrize("case", LOAD_CASES, ids=list(LOAD_CASES))
def test_load_state_dict_bad_input(model, case):
    edit, exc, msg = LOAD_CASES[case]
    d = {k: v + 1.0 for k, v in model.state_dict().items()}   # valid values, all different
    edit(d)
    snap = snapshot(model, *[v for v in d.values() if isinstance(v, np.ndarray)])
    with pytest.raises(exc, match=msg):
        model.load_state_dict(d)
    assert_unchanged(model, snap, *[v for v in d.values() if isinstance(v, np.ndarray)])


def test_load_state_dict_not_a_mapping(model):
    with pytest.raises(TypeError, match="state_dict must be a mapping, got list"):
        model.load_state_dict([1, 2])


CONSTRUCTOR_CASES = {
    "input-zero": (dict(input_size=0, hidden_size=3), ValueError, "input_size must be >= 1, got 0"),
    "hidden-float": (dict(input_size=2, hidden_size=2.5), TypeError,
                     "hidden_size must be an int, got float"),
    "dtype-int32": (dict(input_size=2, hidden_size=3, dtype=np.int32), TypeError,
                    "dtype must be float32 or float64"),
    "dtype-float16": (dict(input_size=2, hidden_size=3, dtype=np.float16), TypeError,
                      "dtype must be float32 or float64"),
    "seed-negative": (dict(input_size=3, hidden_size=4, seed=-1), ValueError,
                      "seed must be >= 0, got -1"),
    "seed-float": (dict(input_size=3, hidden_size=4, seed=1.5), TypeError,
                   "seed must be an int, got float"),
    "hidden-huge": (dict(input_size=3, hidden_size=10 ** 9), ValueError,
                    r"LSTM\(input_size=3, hidden_size=1000000000, num_layers=1\) would need "
                    r"[0-9.e+]+ GiB, more than this machine's"),
    "input-huge": (dict(input_size=10 ** 12, hidden_size=3), ValueError,
                   r"LSTM\(input_size=1000000000000, hidden_size=3.* would need"),
    "layers-huge": (dict(input_size=3, hidden_size=1000, num_layers=10 ** 6), ValueError,
                    r"num_layers=1000000\) would need"),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=list(CONSTRUCTOR_CASES))
def test_constructor_bad_input(case):
    kwargs, exc, msg = CONSTRUCTOR_CASES[case]
    with pytest.raises(exc, match=msg):
        fastlstm.LSTM(**kwargs)


def test_a_workspace_too_large_names_x():
    m = fastlstm.LSTM(2, 3, seed=0)
    x = np.broadcast_to(np.float32(1), (10 ** 6, 10 ** 5, 2))   # no memory behind it
    with pytest.raises(ValueError, match=r"the workspace for T=1000000, B=100000 \(x's shape\) "
                                         r"would need [0-9.e+]+ GiB"):
        m.forward(x)


# -- what is accepted, and how --------------------------------------------

def test_other_float_dtypes_are_cast():
    """Documented policy: floating inputs are cast to the model's dtype."""
    m = fastlstm.LSTM(I, H, dtype=np.float32, seed=0)
    x64 = np.random.default_rng(2).standard_normal((T, B, I))
    y_from64 = m.forward(x64)[0].copy()
    y_from32 = m.forward(x64.astype(np.float32))[0].copy()
    y_from16 = m.forward(x64.astype(np.float16))[0]
    assert y_from64.dtype == np.float32
    assert np.array_equal(y_from64, y_from32)
    np.testing.assert_allclose(y_from16, y_from32, atol=1e-2)


def test_non_contiguous_input_gives_same_result():
    m = fastlstm.LSTM(I, H, dtype=np.float64, seed=0)
    rng = np.random.default_rng(3)
    big = rng.standard_normal((B, 2 * T, 2 * I))
    x_strided = big.transpose(1, 0, 2)[::2, :, ::2]    # (T, B, I), no unit stride anywhere
    assert not x_strided.flags.c_contiguous
    dy_f = np.asfortranarray(rng.standard_normal((T, B, H)))
    y1 = m.forward(x_strided)[0].copy()
    dx1 = m.backward(dy_f)[0].copy()
    g1 = m.flat_grads.copy()
    m.zero_grad()
    y2 = m.forward(np.ascontiguousarray(x_strided))[0].copy()
    dx2 = m.backward(np.ascontiguousarray(dy_f))[0].copy()
    assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2)
    assert np.array_equal(g1, m.flat_grads)


def test_nan_propagates_without_exception():
    m = fastlstm.LSTM(I, H, dtype=np.float64, seed=0)
    x = np.ones((T, B, I))
    x[1, 0, 0] = np.nan
    y, (h_n, c_n) = m.forward(x)
    assert np.isnan(y[1:, 0]).all() and np.isfinite(y[:, 1:]).all() and np.isfinite(y[0]).all()
    assert np.isnan(h_n[0, 0]).all()
    dx = m.backward(np.ones((T, B, H)))[0]
    assert np.isnan(dx[:2, 0]).any() and np.isfinite(dx[:, 1:]).all()


def test_successful_calls_never_write_callers_arrays():
    m = fastlstm.LSTM(I, H, dtype=np.float64, seed=0)
    rng = np.random.default_rng(4)
    args = [rng.standard_normal(s) for s in [(T, B, I), (1, B, H), (1, B, H),
                                             (T, B, H), (1, B, H), (1, B, H)]]
    copies = [x.copy() for x in args]
    m.forward(args[0], (args[1], args[2]))
    m.backward(args[3], (args[4], args[5]))
    for x, c in zip(args, copies):
        assert np.array_equal(x, c)


def test_outputs_are_readonly_views():
    m = fastlstm.LSTM(I, H, seed=0)
    y, (h_n, c_n) = m.forward(np.ones((T, B, I), np.float32))
    dx, (dh0, dc0) = m.backward(np.ones((T, B, H), np.float32))
    for out in (y, h_n, c_n, dx, dh0, dc0):
        assert not out.flags.writeable
        with pytest.raises(ValueError):
            out[...] = 0


# -- the full layer's arguments -------------------------------------------------

@pytest.fixture
def deep():
    m = fastlstm.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=3, dtype=np.float64,
                      seed=0)
    rng = np.random.default_rng(0)
    m.forward(rng.standard_normal((T, B, I)))
    m.backward(rng.standard_normal((T, B, 6)))
    return m


LAYER_FORWARD_CASES = {
    "lengths-shape": (dict(lengths=[3, 4]), ValueError,
                      r"lengths must have shape \(3,\) \(one length per sequence\), got \(2,\)"),
    "lengths-2d": (dict(lengths=np.ones((3, 1), int)), ValueError, r"lengths must have shape \(3,\)"),
    "lengths-float": (dict(lengths=[1.0, 2.0, 3.0]), TypeError, r"lengths must hold integers, got dtype float64"),
    "lengths-zero": (dict(lengths=[0, 2, 3]), ValueError, r"lengths must lie in \[1, T=4\], got min 0"),
    "lengths-long": (dict(lengths=[1, 5, 3]), ValueError, r"lengths must lie in \[1, T=4\].*max 5"),
    "lengths-str": (dict(lengths="abc"), TypeError, r"lengths must be a sequence of ints, got str"),
    "h0-layers": (dict(state=(a(2, B, 3), a(4, B, H))), ValueError,
                  r"state\[0\] \(h\) must have shape \(4, 3, 3\), got \(2, 3, 3\)"),
    "c0-proj": (dict(state=(a(4, B, 3), a(4, B, 3))), ValueError,
                r"state\[1\] \(c\) must have shape \(4, 3, 5\), got \(4, 3, 3\)"),
}


@pytest.mark.parametrize("case", LAYER_FORWARD_CASES, ids=list(LAYER_FORWARD_CASES))
def test_layer_forward_bad_input(deep, case):
    kwargs, exc, msg = LAYER_FORWARD_CASES[case]
    x = np.ones((T, B, I))
    arrays = [x] + [v for v in kwargs.values() if isinstance(v, np.ndarray)]
    arrays += [s for v in kwargs.values() if isinstance(v, tuple) for s in v]
    snap = snapshot(deep, *arrays)
    with pytest.raises(exc, match=msg):
        deep.forward(x, **kwargs)
    assert_unchanged(deep, snap, *arrays)


def test_layer_backward_bad_dy(deep):
    snap = snapshot(deep)
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 3, 6\), got \(4, 3, 3\)"):
        deep.backward(a(T, B, 3))
    with pytest.raises(ValueError, match=r"dstate\[1\] \(c\) must have shape \(4, 3, 5\)"):
        deep.backward(a(T, B, 6), (a(4, B, 3), a(1, B, H)))
    assert_unchanged(deep, snap)


LAYER_CONSTRUCTOR_CASES = {
    "proj-equal": (dict(proj_size=5), ValueError, r"proj_size must be smaller than hidden_size=5, got 5"),
    "proj-negative": (dict(proj_size=-1), ValueError, r"proj_size must be >= 0, got -1"),
    "dropout-one": (dict(dropout=1.0), ValueError,
                    r"dropout must be a finite number in \[0.0, 1.0\), got 1.0"),
    "dropout-negative": (dict(dropout=-0.1), ValueError,
                         r"dropout must be a finite number in \[0.0, 1.0\)"),
    "dropout-str": (dict(dropout="0.5"), TypeError, r"dropout must be a real number, got str"),
    "layers-zero": (dict(num_layers=0), ValueError, r"num_layers must be >= 1, got 0"),
    "bidirectional-int": (dict(bidirectional=1), TypeError, r"bidirectional must be a bool, got int"),
    "clip-zero": (dict(cell_clip=0.0), ValueError, r"cell_clip must be a finite number in \(0.0, inf\)"),
    "clip-nan": (dict(cell_clip=float("nan")), ValueError, r"cell_clip must be a finite number"),
    "forget-bias-no-bias": (dict(forget_bias=1.0, bias=False), ValueError,
                            r"forget_bias=1.0 needs bias=True"),
    "zoneout-one": (dict(zoneout=1.0), ValueError,
                    r"zoneout must be a finite number in \[0.0, 1.0\), got 1.0"),
    "zoneout-cell-negative": (dict(zoneout_cell=-0.2), ValueError,
                              r"zoneout_cell must be a finite number in \[0.0, 1.0\), got -0.2"),
    "recurrent-dropout-str": (dict(recurrent_dropout="0.3"), TypeError,
                              r"recurrent_dropout must be a real number, got str"),
    "peephole-int": (dict(peephole=1), TypeError, r"peephole must be a bool, got int"),
    "layer-norm-str": (dict(layer_norm="yes"), TypeError, r"layer_norm must be a bool, got str"),
}


@pytest.mark.parametrize("case", LAYER_CONSTRUCTOR_CASES, ids=list(LAYER_CONSTRUCTOR_CASES))
def test_layer_constructor_bad_input(case):
    kwargs, exc, msg = LAYER_CONSTRUCTOR_CASES[case]
    with pytest.raises(exc, match=msg):
        fastlstm.LSTM(I, H, **kwargs)


# -- SequenceModel, fit, optimizers ---------------------------------------------

SX, SY = a(4, 5, 2, dtype=np.float32), a(4, 1, dtype=np.float32)

MODEL_CASES = {
    "model-seed": (lambda m, o: fastlstm.SequenceModel(2, 3, 1, seed=-1), ValueError,
                   r"seed must be >= 0, got -1"),
    "model-backend": (lambda m, o: fastlstm.SequenceModel(2, 3, 1, backend="cuda"), ValueError,
                      r"backend must be one of \('fastlstm', 'reference'\), got 'cuda'"),
    "fit-no-sequences": (lambda m, o: m.fit(SX[:0], SY[:0], o, progress=False), ValueError,
                         r"x must hold at least one sequence of at least one step, got shape "
                         r"\(0, 5, 2\)"),
    "fit-no-steps": (lambda m, o: m.fit(SX[:, :0], SY, o, progress=False), ValueError,
                     r"at least one step, got shape \(4, 0, 2\)"),
    "fit-seed": (lambda m, o: m.fit(SX, SY, o, seed=-1, progress=False), ValueError,
                 r"seed must be >= 0, got -1"),
    "fit-patience": (lambda m, o: m.fit(SX, SY, o, validation=(SX, SY), patience=0,
                                        progress=False), ValueError, r"patience must be >= 1, got 0"),
    "fit-max-seconds": (lambda m, o: m.fit(SX, SY, o, max_seconds=-1, progress=False), ValueError,
                        r"max_seconds must be a finite number in \(0.0, inf\), got -1"),
    "fit-validation": (lambda m, o: m.fit(SX, SY, o, validation=[SX], progress=False), TypeError,
                       r"validation must be a tuple \(x_val, y_val\)"),
    "fit-lengths": (lambda m, o: m.fit(SX, SY, o, lengths=[1, 2], progress=False), ValueError,
                    r"lengths must have shape \(4,\)"),
    "step-clip": (lambda m, o: m.train_step(SX, SY, o, clip_norm=-1), ValueError,
                  r"clip_norm must be a finite number in \(0.0, inf\), got -1"),
    "step-no-optimizer": (lambda m, o: m.train_step(SX, SY, None), ValueError,
                          r"opt was built for another model"),
    "adam-betas": (lambda m, o: fastlstm.Adam(m, betas=0.9), TypeError,
                   r"betas must be a pair \(beta1, beta2\), got 0.9"),
    "clip-no-model": (lambda m, o: fastlstm.clip_grad_norm(object(), 1.0), TypeError,
                      r"model must expose flat_grads"),
}


@pytest.mark.parametrize("case", MODEL_CASES, ids=list(MODEL_CASES))
def test_model_bad_input(case):
    call, exc, msg = MODEL_CASES[case]
    m = fastlstm.SequenceModel(2, 3, 1, seed=0)
    opt = fastlstm.Adam(m)
    m.train_step(SX, SY, opt)
    params, grads, state = m.flat_params.copy(), m.flat_grads.copy(), opt.state_dict()
    with pytest.raises(exc, match=msg):
        call(m, opt)
    assert np.array_equal(m.flat_params, params) and np.array_equal(m.flat_grads, grads)
    after = opt.state_dict()
    assert after["steps"] == state["steps"]
    assert all(np.array_equal(after["state"][k], v) for k, v in state["state"].items())


CATALOGUED = (FORWARD_CASES, BACKWARD_CASES, LOAD_CASES, LAYER_FORWARD_CASES, CONSTRUCTOR_CASES,
              LAYER_CONSTRUCTOR_CASES, MODEL_CASES)


def test_catalogue_lists_every_case_and_only_cases():
    """docs/errors.md names every parametrised bad-input case of this file in brackets,
    [id, id], and every bracketed id is a case here or a test of this file
    (test_<id with - as _>): matched as whole ids, never as words of the prose."""
    import pathlib
    import re
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    listed = {i.strip() for group in re.findall(r"\[([a-z][\w-]*(?:, [a-z][\w-]*)*)\]", doc,
                                                   flags=re.I)
              for i in group.split(",")}
    import test_refusals as more  # the refusals tested there, by the same rule
    cases = {name for table in CATALOGUED for name in table}
    cases |= {name for table in (more.CHECKPOINTS, more.VALIDATION, more.BAD_OPTIONS,
                                 more.BENCH_CASES, more.TRAIN_CASES) for name in table}
    tests = {n[5:].replace("_", "-") for n in (*globals(), *vars(more))
             if n.startswith("test_")}
    assert cases - listed == set(), "cases missing from docs/errors.md"
    assert listed - cases - tests == set(), "ids in docs/errors.md that no test here has"
