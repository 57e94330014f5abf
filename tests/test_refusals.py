"""A refused call changes nothing, and says what is wrong: checkpoints, fit,
train_step, the backends' shared checks, booleans taken for numbers."""
import json
import os

import numpy as np
import pytest

import fastlstm


def _model(**kw):
    kw.setdefault("dtype", np.float64)
    return fastlstm.SequenceModel(2, 3, 1, seed=0, **kw)


def _data(N=8, T=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, T, 2)), rng.standard_normal((N, 1))


def _snapshot(model, opt):
    return (model.flat_params.copy(), model.flat_grads.copy(), opt.steps,
            {k: v.copy() for k, v in opt.state.items()})


def _assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    for k in a[3]:
        np.testing.assert_array_equal(a[3][k], b[3][k])


# -- checkpoints ----------------------------------------------------------------

def test_save_refuses_another_models_optimizer(tmp_path):
    model, other = _model(), _model()
    x, y = _data()
    opt = fastlstm.Adam(model)
    model.train_step(x, y, opt)
    path = tmp_path / "m.npz"
    model.save(path, opt)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="optimizer was built for another model"):
        other.save(path, fastlstm.Adam(model))
    assert path.read_bytes() == before
    loaded, lopt = fastlstm.load(path, with_optimizer=True)
    assert lopt.steps == 1


def test_checkpoint_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _model().save(tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o644


def _checkpoint(tmp_path, **changes):
    model = _model()
    opt = fastlstm.Adam(model)
    path = tmp_path / "good.npz"
    model.save(path, opt)
    data = dict(np.load(path))
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    return bad, json.loads(str(data.get("config", np.array("{}"))))


def _config(**kw):
    cfg = _model().config
    return np.array(json.dumps(dict(cfg, **kw)))


CHECKPOINTS = {
    "hidden-huge": (dict(config=_config(hidden_size=6000)), r"param/weight_ih_l0 is float64"),
    "layers-huge": (dict(config=_config(num_layers=400000)), "describes 1600002 parameter arrays"),
    "config-key": (dict(config=_config(foo=1)), r"unknown config keys \['foo'\]"),
    "config-list": (dict(config=np.array("[1]")), "'config' is not valid: JSON of type list"),
    "format-str": (dict(format=np.array("x")), "'format' is .*expected the integer 1"),
    "rng-bad": (dict(dropout_rng=np.array('{"a": 1}')), "'dropout_rng' is not a generator"),
    "rng-json": (dict(dropout_rng=np.array("nonsense")), "'dropout_rng' is not valid"),
    "hyper-bad": ({"opt/hyper": np.array('{"lr": "x"}')}, "'opt/hyper' does not build"),
    "hyper-list": ({"opt/hyper": np.array("[1]")}, "'opt/hyper' is not valid"),
    "opt-type": ({"opt/type": np.array("Lion")}, "unknown optimizer"),
    "extra-key": (dict(junk=np.zeros(3)), r"unknown keys \['junk'\]"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_load_checks_the_file_before_building(tmp_path, case, monkeypatch):
    changes, message = CHECKPOINTS[case]
    path, _ = _checkpoint(tmp_path, **changes)
    built = []
    monkeypatch.setattr(fastlstm.model.SequenceModel, "__init__",
                        lambda self, *a, **k: built.append(1) or 1 / 0)
    if case.startswith(("hyper", "opt")):
        monkeypatch.undo()                      # these are checked once the model exists
    with pytest.raises(ValueError, match=message) as info:
        fastlstm.load(path, with_optimizer=True)
    assert str(path) in str(info.value)
    assert not built


@pytest.mark.parametrize("content", ["npy", "text"])
def test_load_of_a_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "f.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_text("hello")
    with pytest.raises(ValueError, match="is not a readable fastlstm checkpoint: it is not an "
                                         r"\.npz archive"):
        fastlstm.load(path)


# -- fit, train_step, forward_backward -------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_a_nan_loss_leaves_the_last_finite_step(fused):
    x, y = _data(N=8)
    x[4:] = np.nan                              # the second batch of 4
    lengths = None if fused else np.full(8, 4)
    a, b = _model(), _model()
    oa, ob = fastlstm.Adam(a), fastlstm.Adam(b)
    a.train_step(x[:4], y[:4], oa, lengths=None if fused else lengths[:4])
    with pytest.raises(FloatingPointError, match="at epoch 1, step 2"):
        b.fit(x, y, ob, epochs=1, batch_size=4, shuffle=False, progress=False, lengths=lengths)
    for p, q in ((a.flat_params, b.flat_params), (oa.state["exp_avg"], ob.state["exp_avg"])):
        np.testing.assert_array_equal(p, q)
    assert ob.steps == oa.steps == 1
    # train_step itself: a non-finite loss is returned without an update
    before = _snapshot(b, ob)[0], ob.steps
    assert np.isnan(b.train_step(x[4:], y[4:], ob, lengths=None if fused else lengths[4:]))
    np.testing.assert_array_equal(b.flat_params, before[0])
    assert ob.steps == before[1]


VALIDATION = {
    "x-features": lambda x, y: (x[:, :, :1], y),
    "y-rows": lambda x, y: (x, y[:5]),
    "y-width": lambda x, y: (x, y[:, :0]),
    "lengths": lambda x, y: (x, y, np.full(len(x), 9)),
    "x-int": lambda x, y: (x.astype(int), y),
}


@pytest.mark.parametrize("case", sorted(VALIDATION))
def test_fit_checks_validation_data_before_the_first_step(case):
    model = _model()
    opt = fastlstm.Adam(model)
    x, y = _data()
    before = _snapshot(model, opt)
    with pytest.raises((TypeError, ValueError), match=r"validation\[\d\]"):
        model.fit(x, y, opt, epochs=1, validation=VALIDATION[case](x, y), progress=False)
    _assert_same(before, _snapshot(model, opt))


@pytest.mark.parametrize("call", ["train_step", "forward_backward"])
@pytest.mark.parametrize("bad", ["x-features", "lengths", "state"])
def test_a_refused_step_keeps_the_accumulated_gradients(call, bad):
    model = _model()
    opt = fastlstm.Adam(model)
    x, y = _data()
    model.forward_backward(x, y)                # gradients the user is accumulating
    before = _snapshot(model, opt)
    args = dict(x=x, y=y)
    if bad == "x-features":
        args["x"] = x[:, :, :1]
    elif bad == "lengths":
        args["lengths"] = np.full(len(x), 9)
    if call == "train_step":
        if bad == "state":
            args["clip_norm"] = -1.0
        with pytest.raises((TypeError, ValueError)):
            model.train_step(args.pop("x"), args.pop("y"), opt, **args)
    else:
        if bad == "state":
            args["state"] = (np.zeros((1, 8, 3)), np.zeros((1, 7, 3)))
        with pytest.raises((TypeError, ValueError)):
            model.forward_backward(**args)
    _assert_same(before, _snapshot(model, opt))


# -- one set of checks for both backends; booleans are not numbers -----------------

BAD_OPTIONS = {
    "zoneout-one": (dict(zoneout=1.0), ValueError, "zoneout must be a finite number in"),
    "zoneout-negative": (dict(zoneout=-0.5), ValueError, "zoneout must be a finite number"),
    "zoneout-str": (dict(zoneout="0.1"), TypeError, "zoneout must be a real number"),
    "zoneout-inf": (dict(zoneout=float("inf")), ValueError, "zoneout must be a finite"),
    "rdrop-nan": (dict(recurrent_dropout=float("nan")), ValueError, "recurrent_dropout must"),
    "rdrop-one": (dict(recurrent_dropout=1.0), ValueError, "recurrent_dropout must"),
    "peephole-str": (dict(peephole="no"), TypeError, "peephole must be a bool"),
    "input-zero": (dict(input_size=0), ValueError, "input_size must be >= 1"),
    "hidden-float": (dict(hidden_size=2.5), TypeError, "hidden_size must be an int"),
    "hidden-bool": (dict(hidden_size=True), TypeError, "hidden_size must be an int, got bool"),
    "layers-bool": (dict(num_layers=True), TypeError, "num_layers must be an int, got bool"),
    "threads-bool": (dict(threads=True), TypeError, "threads must be an int, got bool"),
    "forget-bias-str": (dict(forget_bias="1"), TypeError, "forget_bias must be a real"),
}


@pytest.mark.parametrize("backend", ["fastlstm", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_both_backends_validate_alike(backend, case):
    kw, exc, message = BAD_OPTIONS[case]
    args = dict(input_size=2, hidden_size=3)
    args.update(kw)
    with pytest.raises(exc, match=message):
        fastlstm.SequenceModel(args.pop("input_size"), args.pop("hidden_size"), 1,
                               backend=backend, **args)


def test_the_reference_refuses_what_it_lacks():
    with pytest.raises(ValueError, match="the reference is one layer"):
        fastlstm.SequenceModel(2, 3, 1, backend="reference", bidirectional=True)


@pytest.mark.parametrize("kw,name", [(dict(epochs=True), "epochs"),
                                     (dict(batch_size=True), "batch_size"),
                                     (dict(bptt=True), "bptt")])
def test_fit_refuses_booleans_for_counts(kw, name):
    model = _model()
    opt = fastlstm.Adam(model)
    x, y = _data()
    with pytest.raises(TypeError, match=f"{name} must be an int, got bool"):
        model.fit(x, y, opt, progress=False, **kw)
    assert opt.steps == 0


def test_lstm_refuses_booleans_for_sizes():
    for kw in (dict(input_size=True, hidden_size=3), dict(input_size=2, hidden_size=3,
                                                          proj_size=True)):
        with pytest.raises(TypeError, match="must be an int, got bool"):
            fastlstm.LSTM(**kw)


# -- the command line refuses bad options before it trains ---------------------

def _data_file(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


def _train_cases(tmp_path):
    x = np.zeros((10, 5, 2))
    (tmp_path / "text.npz").write_text("hello")
    return {
        "lr-inf": (["--lr", "inf"], "--lr: must be > 0 and finite"),
        "lr-nan": (["--lr", "nan"], "--lr: must be > 0 and finite"),
        "seq-len-1": (["--seq-len", "1"], "--seq-len must be >= 2 for the adding problem"),
        "save-missing-folder": (["--save", str(tmp_path / "no" / "m.npz")],
                                "--save .* does not exist"),
        "save-folder": (["--save", str(tmp_path)], "--save .* is a folder"),
        "onnx-folder": (["--export-onnx", "."], "--export-onnx '.' is a folder"),
        "onnx-layer-norm": (["--layer-norm", "--export-onnx", str(tmp_path / "m.onnx")],
                            "--export-onnx cannot express --layer-norm"),
        "data-y-length": (["--data", _data_file(tmp_path, "leny", x=x, y=np.zeros((9, 1)))],
                          r"--data: y in .* must have shape \(10, O\)"),
        "data-one": (["--data", _data_file(tmp_path, "one", x=x[:1], y=np.zeros((1, 1)))],
                     "--data: x in .* must hold at least 2 sequences"),
        "data-text": (["--data", str(tmp_path / "text.npz")], "--data: .* is not an .npz"),
        "data-negative-label": (["--data", _data_file(tmp_path, "neg", x=x,
                                                      y=-np.ones(10, np.int64))],
                                "--data: y in .* class labels, which must be >= 0"),
    }


BENCH_CASES = {
    "min-time-negative": (["--min-time", "-1"], "--min-time: must be > 0 and finite"),
    "min-time-nan": (["--min-time", "nan"], "--min-time: must be > 0 and finite"),
    "min-time-inf": (["--min-time", "inf"], "--min-time: must be > 0 and finite"),
    "layers-zero": (["--layers", "0"], "--layers: must be > 0"),
    "layers-negative": (["--layers", "-2"], "--layers: must be > 0"),
    "proj-negative": (["--proj", "-1"], "--proj: must be >= 0"),
    "proj-too-large": (["--proj", "99", "--size", "small"], "--proj must be smaller than"),
    "size-too-large": (["--size", "100000,100000,512,512"], "--size .* would need"),
}


TRAIN_CASES = ["lr-inf", "lr-nan", "seq-len-1", "save-missing-folder", "save-folder",
               "onnx-folder", "onnx-layer-norm", "data-y-length", "data-one", "data-text",
               "data-negative-label"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_bad_options_before_training(tmp_path, capsys, monkeypatch, case):
    from fastlstm import cli, tasks
    args, message = _train_cases(tmp_path)[case]
    trained = []
    for name in ("train_adding", "train_data", "train_sine"):
        monkeypatch.setattr(tasks, name, lambda *a, **k: trained.append(1))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *args])
    assert info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not trained


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_bench_refuses_bad_options(capsys, case):
    from fastlstm import cli
    args, message = BENCH_CASES[case]
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", *args])
    assert info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


# -- export_onnx and from_keras name what is wrong ---------------------------------

@pytest.mark.parametrize("path,opset,exc,message", [
    (None, None, TypeError, "path must be a file name"),
    (123, None, TypeError, "path must be a file name"),
    ("m.onnx", 30, ValueError, r"opset must be in \[14, "),
    ("m.onnx", 10 ** 6, ValueError, r"opset must be in \[14, "),
    ("m.onnx", 13, ValueError, r"opset must be in \[14, "),
    ("m.onnx", 17.9, TypeError, "opset must be an int, got float"),
    ("m.onnx", "abc", TypeError, "opset must be an int, got str"),
])
def test_export_onnx_checks_path_and_opset(tmp_path, monkeypatch, path, opset, exc, message):
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=message):
        fastlstm.export_onnx(fastlstm.LSTM(3, 4), path, opset)
    assert not os.listdir(tmp_path)


def test_a_failed_export_keeps_the_previous_file(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    fastlstm.export_onnx(fastlstm.LSTM(3, 4), path)
    before = path.read_bytes()

    def explode(*a, **k):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", explode)
    with pytest.raises(OSError, match="simulated"):
        fastlstm.export_onnx(fastlstm.LSTM(3, 5), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("weights,exc,message", [
    (None, TypeError, "weights must be a list"),
    ("abc", TypeError, "weights must be a list"),
    ([None], TypeError, r"weights\[0\] must be a Keras LSTM layer"),
    ([[np.zeros(12), np.zeros((3, 12)), np.zeros(12)]], ValueError,
     r"weights\[0\]\[0\] \(kernel\) must have shape \(input_size, 4 \* units\), got \(12,\)"),
    ([[np.zeros((3, 17)), np.zeros((4, 16)), np.zeros(16)]], ValueError,
     r"weights\[0\]\[0\] \(kernel\) must have shape .* got \(3, 17\)"),
    ([["a", "b", "c"]], TypeError, r"weights\[0\]\[0\] must be a floating array, got str"),
    ([[np.zeros((3, 16)), np.zeros((5, 16)), np.zeros(16)]], ValueError,
     r"weights\[0\]\[1\] \(recurrent_kernel\) must have shape \(4, 16\), got \(5, 16\)"),
    ([[np.zeros((3, 16)), np.zeros((4, 16)), np.zeros(15)]], ValueError,
     r"weights\[0\]\[2\] \(bias\) must have shape \(16,\), got \(15,\)"),
])
def test_from_keras_names_the_keras_weight(weights, exc, message):
    with pytest.raises(exc, match=message):
        fastlstm.from_keras(weights)


def test_data_parallel_names_its_arguments():
    pytest.importorskip("mpi4py")
    code = """
import numpy as np, fastlstm
from fastlstm.distributed import DataParallel
m = fastlstm.SequenceModel(2, 3, 1)
y, opt = np.ones((1, 1), np.float32), fastlstm.Adam(m)
for call in (lambda: DataParallel(m, comm="world"),
             lambda: DataParallel(m).train_step(None, y, opt),
             lambda: DataParallel(m).fit([[1.0]], y, opt),
             lambda: DataParallel(m).fit(np.ones((4, 3, 2), np.float32), np.ones((4, 1)), opt,
                                         batch_size="4")):
    try:
        call()
    except TypeError as e:
        print(e)
"""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.splitlines()
    assert lines == ["comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD), got str",
                     "x must be a numpy.ndarray, got NoneType",
                     "x must be a numpy.ndarray, got list",
                     "batch_size must be an int, got str"], out.stdout + out.stderr
