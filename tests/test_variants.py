"""The variants (peepholes, layer normalisation, zoneout, recurrent dropout)
against a torch-autograd step loop written in tests/helpers.py, alone and
combined with layers, directions, lengths, projection, cell clip and
batch_first; in training mode with the masks the layer drew."""
import itertools

import numpy as np
import pytest

import fastlstm

from helpers import TOL, rel_err, run_ours, torch_step_loop

VARIANTS = {
    "peephole": dict(peephole=True),
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=0.3, zoneout_cell=0.4),
    "zoneout_h": dict(zoneout=0.5),
    "rdrop": dict(recurrent_dropout=0.4),
    "all": dict(peephole=True, layer_norm=True, zoneout=0.2, zoneout_cell=0.3,
                recurrent_dropout=0.3),
}

SHAPES = {
    "L1": dict(),
    "L2-bi": dict(num_layers=2, bidirectional=True),
    "L2-proj-clip": dict(num_layers=2, proj_size=3, cell_clip=0.8),
    "bi-bf-nobias": dict(bidirectional=True, batch_first=True, bias=False),
    "L3-dropout": dict(num_layers=3, dropout=0.3),
}


def make(seed, variant, shape, dtype=np.float64, T=7, B=5, I=3, H=6):
    cfg = dict(VARIANTS[variant], **SHAPES[shape])
    m = fastlstm.LSTM(I, H, dtype=dtype, seed=seed, **cfg)
    # Away from initialisation (LN gains 1, biases 0), so that every parameter matters.
    rng = np.random.default_rng(seed + 100)
    m.flat_params += 0.3 * rng.standard_normal(m.flat_params.size).astype(dtype)
    D, L, P = m.num_directions, m.num_layers, m.proj_size or H
    arr = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    bf = m.batch_first
    prob = dict(x=arr(B, T, I) if bf else arr(T, B, I), h0=arr(D * L, B, P),
                c0=arr(D * L, B, H), dy=arr(B, T, D * P) if bf else arr(T, B, D * P),
                dh_n=arr(D * L, B, P), dc_n=arr(D * L, B, H))
    return m, prob


CASES = list(itertools.product(VARIANTS, SHAPES, [False, True]))


@pytest.mark.torch
@pytest.mark.parametrize("variant,shape,use_lengths", CASES,
                         ids=[f"{v}-{s}" + ("-lengths" if n else "") for v, s, n in CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_variant_matches_torch_step_loop(torch, variant, shape, use_lengths, training):
    m, prob = make(3, variant, shape)
    m.train(training)
    lengths = [3, 7, 1, 5, 7] if use_lengths else None
    got = run_ours(m, prob, lengths)
    want = torch_step_loop(torch, m, prob, lengths)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) <= 1e-9, (k, rel_err(got[k], want[k]))


@pytest.mark.torch
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_float32_matches_torch_float64(torch, variant):
    m, prob = make(4, variant, "L2-bi", np.float32)
    got = run_ours(m, prob, [3, 7, 1, 5, 7])
    m64 = fastlstm.LSTM(**dict(m.config(), dtype="float64"))
    m64.load_state_dict(m.state_dict())
    p64 = {k: v.astype(np.float64) for k, v in prob.items()}
    want = torch_step_loop(torch, m64, p64, [3, 7, 1, 5, 7], masks=m.last_masks)
    for k in want:
        assert rel_err(got[k], want[k]) <= TOL[np.float32], (k, rel_err(got[k], want[k]))


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", ["L1", "L2-proj-clip", "L1-T48"])
def test_variant_with_packed_products_matches_torch(torch, variant, shape, dtype):
    """H = 64 (and a projection to 32 in float64): the recurrent products run from
    packed panels (_gemm) in both directions; B = 6 leaves two rows past the
    micro-kernel's blocks of four. T = 48: the backward's row-wise products run in two
    or three chunks of steps (_recurrence.CHUNK_BYTES), padded steps among them."""
    T = 48 if shape == "L1-T48" else 5
    m, prob = make(5, variant, "L1" if T == 48 else shape, dtype, T=T, B=6, I=4, H=64)
    if shape == "L2-proj-clip":
        m = fastlstm.LSTM(**dict(m.config(), proj_size=32))
        m.flat_params += 0.3 * np.random.default_rng(7).standard_normal(
            m.flat_params.size).astype(dtype)
        rng = np.random.default_rng(8)
        prob.update(h0=rng.standard_normal((2, 6, 32)).astype(dtype),
                    dy=rng.standard_normal((5, 6, 32)).astype(dtype),
                    dh_n=rng.standard_normal((2, 6, 32)).astype(dtype))
    lengths = [3, 5, 1, 5, 4, 2] if T == 5 else [30, 48, 1, 48, 21, 2]
    got = run_ours(m, prob, lengths)
    m64 = fastlstm.LSTM(**dict(m.config(), dtype="float64"))
    m64.load_state_dict(m.state_dict())
    p64 = {k: v.astype(np.float64) for k, v in prob.items()}
    want = torch_step_loop(torch, m64, p64, lengths, masks=m.last_masks)
    tol = 1e-9 if dtype == np.float64 else TOL[np.float32]
    for k in want:
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))


REF_VARIANTS = ["peephole", "layer_norm", "zoneout", "rdrop", "all"]


@pytest.mark.parametrize("variant", REF_VARIANTS)
def test_variant_matches_reference(variant):
    """One layer against the NumPy reference built with the same seed: in training
    mode both draw the same masks from their generators (float32 masks are other
    draws than float64's, hence float64 here; float32 is graded against torch)."""
    from fastlstm.reference import ReferenceLSTM
    dtype = np.float64
    cfg = VARIANTS[variant]
    fast = fastlstm.LSTM(3, 6, dtype=dtype, seed=9, **cfg)
    ref = ReferenceLSTM(3, 6, dtype=dtype, seed=9, **cfg)
    rng = np.random.default_rng(1)
    fast.flat_params += (0.3 * rng.standard_normal(fast.flat_params.size)).astype(dtype)
    ref.load_state_dict({k: v.astype(np.float64) for k, v in fast.state_dict().items()})
    x = rng.standard_normal((8, 4, 3)).astype(dtype)
    dy = rng.standard_normal((8, 4, 6)).astype(dtype)
    lengths = [8, 3, 1, 6]
    for model in (fast, ref):
        model.zero_grad()
    y, (h, c) = fast.forward(x, lengths=lengths)
    y, h, c = y.copy(), h.copy(), c.copy()
    dx = fast.backward(dy)[0].copy()
    y_r, (h_r, c_r) = ref.forward(x.astype(np.float64), lengths=lengths)
    dx_r = ref.backward(dy.astype(np.float64))[0]
    if "zoneout_h" in fast.last_masks:
        assert np.array_equal(fast.last_masks["zoneout_h"][0], ref._cache["z_h"])
        assert fast.last_masks["zoneout_h"].any()
    tol = TOL[np.float64]
    for a, b in ((y, y_r), (h, h_r), (c, c_r), (dx, dx_r)):
        assert rel_err(a, b) <= tol
    for k in fast.grads:
        assert rel_err(fast.grads[k], ref.grads[k]) <= tol, k


@pytest.mark.parametrize("variant", ["zoneout", "rdrop", "all"])
def test_training_masks_against_finite_differences(variant):
    """In training mode, with the masks held fixed (the generator restored before
    each forward), the fast layer's gradients are the loss's derivatives."""
    m, prob = make(6, variant, "L2-bi", T=4, B=3, I=2, H=3)
    lengths = [4, 2, 3]
    state0 = m.get_rng_state()
    got = run_ours(m, prob, lengths)

    def loss():
        m.set_rng_state(state0)
        y, (h, c) = m.forward(prob["x"], (prob["h0"], prob["c0"]), lengths=lengths)
        return float(np.sum(y * prob["dy"]) + np.sum(h * prob["dh_n"])
                     + np.sum(c * prob["dc_n"]))

    eps = 1e-6
    for target in ("x", "c0", "weight_hh_l0", "weight_hh_l1_reverse", "bias_ih_l1"):
        arr = m.params[target] if target in m.params else prob[target]
        flat = arr.reshape(-1)
        numeric = np.empty(flat.size)
        for k in range(flat.size):
            keep = flat[k]
            flat[k] = keep + eps
            up = loss()
            flat[k] = keep - eps
            down = loss()
            flat[k] = keep
            numeric[k] = (up - down) / (2 * eps)
        assert rel_err(got[target].reshape(-1), numeric) <= 1e-6, target


def test_masks_follow_the_options():
    m = fastlstm.LSTM(2, 4, num_layers=2, bidirectional=True, seed=0, zoneout=0.25,
                      zoneout_cell=0.5, recurrent_dropout=0.5, dtype=np.float64)
    x = np.zeros((50, 40, 2))
    m.forward(x)
    masks = m.last_masks
    assert masks["zoneout_h"].shape == (4, 50, 40, 4) and masks["recurrent"].shape == (4, 40, 4)
    assert set(np.unique(masks["zoneout_h"])) == {0.0, 1.0}
    assert abs(masks["zoneout_h"].mean() - 0.25) < 0.02
    assert abs(masks["zoneout_c"].mean() - 0.5) < 0.02
    assert set(np.unique(masks["recurrent"])) == {0.0, 2.0}
    m.eval()
    m.forward(x)
    masks = m.last_masks
    assert np.all(masks["zoneout_h"] == 0.25) and np.all(masks["zoneout_c"] == 0.5)
    assert np.all(masks["recurrent"] == 1.0)
    assert masks["dropout"] == [None, None]      # dropout=0
    plain = fastlstm.LSTM(2, 4, seed=0)
    assert plain.last_masks is None
    plain.forward(np.zeros((3, 2, 2), np.float32))
    assert set(plain.last_masks) == {"dropout"}


def test_the_variants_parameters_and_their_initialisation():
    m = fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, peephole=True, layer_norm=True,
                      seed=1)
    names = list(m.params)
    for sfx in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        for n, shape in (("weight_ci", (5,)), ("weight_cf", (5,)), ("weight_co", (5,)),
                         ("ln_ih_weight", (20,)), ("ln_ih_bias", (20,)),
                         ("ln_hh_weight", (20,)), ("ln_hh_bias", (20,)),
                         ("ln_c_weight", (5,)), ("ln_c_bias", (5,))):
            assert m.params[n + sfx].shape == shape
            if n.startswith("ln_"):
                assert np.all(m.params[n + sfx] == (1.0 if n.endswith("weight") else 0.0))
            else:
                bound = 1 / np.sqrt(5)
                assert np.all(np.abs(m.params[n + sfx]) <= bound) and m.params[n + sfx].std() > 0
    # torch's own parameters first, under torch's names
    assert names[:4] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]


def test_zero_rates_are_the_plain_layer():
    """zoneout=0 and recurrent_dropout=0 are the plain layer, bit for bit; in
    evaluation recurrent dropout is the identity."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 2))
    plain = fastlstm.LSTM(2, 4, seed=3, dtype=np.float64)
    y0 = plain.forward(x)[0].copy()
    for kw in (dict(zoneout=0.0), dict(recurrent_dropout=0.5)):
        m = fastlstm.LSTM(2, 4, seed=3, dtype=np.float64, **kw).eval()
        assert np.array_equal(m.forward(x)[0], y0), kw


def test_a_state_dict_with_variants_refuses_to_load_into_a_plain_model():
    src = fastlstm.LSTM(2, 4, peephole=True, layer_norm=True)
    with pytest.raises(KeyError, match=r"unexpected keys .*weight_ci_l0.*peephole=True"):
        fastlstm.LSTM(2, 4).load_state_dict(src.state_dict())
    with pytest.raises(KeyError, match=r"missing .*ln_c_bias_l0.*layer_norm=True"):
        fastlstm.LSTM(2, 4, layer_norm=True).load_state_dict(fastlstm.LSTM(2, 4).state_dict())


def test_checkpoint_round_trip_with_every_variant(tmp_path):
    """A saved SequenceModel with the variants loads with its options, parameters and
    generator: the next training step draws the same masks and gives the same loss."""
    m = fastlstm.SequenceModel(2, 5, 1, num_layers=2, bidirectional=True, peephole=True,
                               layer_norm=True, zoneout=0.2, zoneout_cell=0.1,
                               recurrent_dropout=0.3, dtype=np.float64, seed=4)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 7, 2)), rng.standard_normal((6, 1))
    opt = fastlstm.Adam(m, lr=1e-2)
    m.train_step(x, y, opt)
    m.save(tmp_path / "v.npz")
    back = fastlstm.load(tmp_path / "v.npz")
    cfg = back.lstm.config()
    assert (cfg["peephole"], cfg["layer_norm"], cfg["zoneout"], cfg["zoneout_cell"],
            cfg["recurrent_dropout"]) == (True, True, 0.2, 0.1, 0.3)
    assert list(back.lstm.params) == list(m.lstm.params)
    assert np.array_equal(back.flat_params, m.flat_params)
    assert np.array_equal(back.predict(x), m.predict(x))       # evaluation: expectations
    loss_a = m.train_step(x, y, fastlstm.SGD(m, lr=0.1))
    loss_b = back.train_step(x, y, fastlstm.SGD(back, lr=0.1))
    assert loss_a == loss_b
    for k, a in m.lstm.last_masks.items():
        if k != "dropout":
            assert np.array_equal(a, back.lstm.last_masks[k]), k
