"""Export to ONNX, checked in onnxruntime; weights to and from Keras 3 (torch
backend), checked by running Keras itself."""
import os

import numpy as np
import pytest

import fastlstm
from fastlstm.interop import export_onnx, from_keras, to_keras

TOL = 1e-5
REQUIRED = os.environ.get("FASTLSTM_REQUIRE_TORCH", "0") not in ("", "0")   # CI: no skipping


def need(name):
    if REQUIRED:
        return __import__(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="module")
def ort():
    need("onnx")
    return need("onnxruntime")


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return need("keras")


def trained(model, steps=5, seed=0):
    """A few Adam steps on random targets: weights that are not the initial ones."""
    rng = np.random.default_rng(seed)
    seq = model if isinstance(model, fastlstm.SequenceModel) else None
    opt = fastlstm.Adam(model, lr=0.05)
    for _ in range(steps):
        if seq is not None:
            x = rng.standard_normal((4, 6, model.lstm.input_size)).astype(np.float32)
            y = (rng.integers(0, model.output_size, (4,) if model.head == "last" else (4, 6))
                 if model.loss == "ce" else
                 rng.random((4, model.output_size) if model.head == "last"
                            else (4, 6, model.output_size)).astype(np.float32))
            model.train_step(x, y, opt)
        else:
            T, B = 6, 4
            x = rng.standard_normal((B, T, model.input_size) if model.batch_first
                                    else (T, B, model.input_size)).astype(np.float32)
            y, _ = model.forward(x)
            model.zero_grad()
            model.backward(rng.standard_normal(y.shape).astype(np.float32))
            opt.step()
    return model


def session(ort, path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


LAYER_CONFIGS = [dict(num_layers=L, bidirectional=bi, batch_first=bf, bias=bias)
                 for L in (1, 2) for bi in (False, True) for bf in (False, True)
                 for bias in (True, False) if not (bf and not bias and L == 1)]
# peepholes map to ONNX's P; recurrent dropout is the identity in evaluation
LAYER_CONFIGS += [dict(num_layers=2, bidirectional=True, peephole=True),
                  dict(num_layers=1, bidirectional=False, peephole=True, batch_first=True,
                       recurrent_dropout=0.3)]


@pytest.mark.parametrize("cfg", LAYER_CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()))
def test_lstm_in_onnxruntime_matches_forward(ort, tmp_path, cfg):
    m = trained(fastlstm.LSTM(3, 5, seed=1, **cfg)).eval()
    rng = np.random.default_rng(2)
    T, B, D, L = 7, 4, m.num_directions, m.num_layers
    x = rng.standard_normal((B, T, 3) if m.batch_first else (T, B, 3)).astype(np.float32)
    lengths = np.array([7, 2, 5, 1])                 # unsorted, with 1 and T
    h0 = rng.standard_normal((D * L, B, 5)).astype(np.float32)
    c0 = rng.standard_normal((D * L, B, 5)).astype(np.float32)
    y, (h_n, c_n) = m.forward(x, (h0, c0), lengths=lengths)
    got = session(ort, export_onnx(m, tmp_path / "m.onnx")).run(
        None, dict(x=x, lengths=lengths, h0=h0, c0=c0))
    for want, have in zip((y, h_n, c_n), got):
        assert have.shape == want.shape
        assert np.abs(have - want).max() <= TOL


@pytest.mark.parametrize("head", ["last", "all"])
@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
def test_sequence_model_in_onnxruntime_matches_predict(ort, tmp_path, head, loss):
    m = trained(fastlstm.SequenceModel(3, 5, 3, head=head, loss=loss, num_layers=2,
                                       bidirectional=True, seed=0))
    rng = np.random.default_rng(3)
    for T, B in ((6, 4), (11, 1)):                   # dynamic T and B
        x = rng.standard_normal((B, T, 3)).astype(np.float32)
        lengths = rng.integers(1, T + 1, B)
        want = m.predict(x, lengths)
        got = session(ort, export_onnx(m, tmp_path / "s.onnx")).run(
            None, dict(x=x, lengths=lengths))[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= TOL


def test_float64_graphs_pass_the_checker(tmp_path):
    onnx = need("onnx")
    m = fastlstm.LSTM(3, 4, dtype=np.float64, bidirectional=True)
    onnx.checker.check_model(onnx.load(str(export_onnx(m, tmp_path / "d.onnx"))))


def test_peephole_graph_without_initial_state(ort, tmp_path):
    """A SequenceModel's graph has no h0/c0: P is then the LSTM node's 8th input
    after two empty ones."""
    m = trained(fastlstm.SequenceModel(3, 5, 2, peephole=True, seed=0))
    x = np.random.default_rng(5).standard_normal((4, 6, 3)).astype(np.float32)
    lengths = np.array([6, 1, 3, 5])
    got = session(ort, export_onnx(m, tmp_path / "p.onnx")).run(
        None, dict(x=x, lengths=lengths))[0]
    assert np.abs(got - m.predict(x, lengths)).max() <= TOL


@pytest.mark.parametrize("option", [dict(proj_size=2), dict(cell_clip=1.0),
                                    dict(layer_norm=True), dict(zoneout=0.1),
                                    dict(zoneout_cell=0.1)])
def test_options_onnx_cannot_express_are_refused(tmp_path, option):
    need("onnx")
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"ONNX's LSTM operator cannot express {name}="):
        export_onnx(fastlstm.LSTM(3, 4, **option), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match=f"cannot express {name}="):
        export_onnx(fastlstm.SequenceModel(3, 4, 1, **option), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# -- Keras ---------------------------------------------------------------------------

def keras_stack(keras, bidirectional, layers=2, use_bias=True, T=6, I=3, H=5):
    inp = keras.Input((T, I))
    out, made = inp, []
    for _ in range(layers):
        layer = keras.layers.LSTM(H, return_sequences=True, use_bias=use_bias)
        if bidirectional:
            layer = keras.layers.Bidirectional(layer)
        out = layer(out)
        made.append(layer)
    return keras.Model(inp, out), made


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_keras_weights_both_ways(keras, bidirectional, use_bias):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    km, layers = keras_stack(keras, bidirectional, use_bias=use_bias)
    for layer in layers:                             # weights unlike any initialisation
        layer.set_weights([0.5 * rng.standard_normal(w.shape).astype(np.float32)
                           for w in layer.get_weights()])
    want = km.predict(x, verbose=0)
    ours = from_keras(layers, batch_first=True)
    assert ours.num_layers == 2 and ours.bidirectional == bidirectional and ours.bias == use_bias
    assert np.abs(ours.forward(x)[0] - want).max() <= TOL
    back = trained(fastlstm.LSTM(3, 5, num_layers=2, bidirectional=bidirectional,
                                 bias=use_bias, batch_first=True, seed=5))
    for layer, weights in zip(layers, to_keras(back)):
        layer.set_weights(weights)
    assert np.abs(km.predict(x, verbose=0) - back.forward(x)[0]).max() <= TOL
    # and the plain weight lists round-trip exactly
    again = from_keras(to_keras(back), batch_first=True)
    assert np.allclose(again.forward(x)[0], back.forward(x)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("option", [dict(proj_size=2), dict(cell_clip=1.0), dict(peephole=True),
                                    dict(layer_norm=True), dict(zoneout=0.1),
                                    dict(zoneout_cell=0.1)])
def test_options_keras_lacks_are_refused(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"Keras' LSTM cannot express {name}="):
        to_keras(fastlstm.LSTM(3, 4, **option))
    with pytest.raises(ValueError, match=f"Keras' LSTM has no {name}"):
        from_keras([[np.zeros((3, 16)), np.zeros((4, 16)), np.zeros(16)]], **option)


def test_fastlstm_train_exports_onnx(ort, tmp_path):
    import subprocess
    import sys
    path = tmp_path / "m.onnx"
    out = subprocess.run([sys.executable, "-m", "fastlstm", "train", "--task", "sine", "--steps",
                          "5", "--export-onnx", str(path), "--save", str(tmp_path / "m.npz"),
                          "--json"], capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    m = fastlstm.load(tmp_path / "m.npz")
    x = np.random.default_rng(0).standard_normal((3, 9, 1)).astype(np.float32)
    lengths = np.array([9, 4, 1])
    got = session(ort, path).run(None, dict(x=x, lengths=lengths))[0]
    assert np.abs(got - m.predict(x, lengths)).max() <= TOL
