"""SequenceModel: heads and losses against torch, train_step, fit, checkpoints."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastlstm

from helpers import TOL, rel_err


def problem(head, loss, dtype, lengths, seed=0, N=5, T=6, I=3, O=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, T, I)).astype(dtype)
    lead = (N,) if head == "last" else (N, T)
    if loss == "ce":
        y = rng.integers(0, O, lead)
    elif loss == "bce":
        y = (rng.random(lead + (O,)) > 0.5).astype(dtype)
    else:
        y = rng.standard_normal(lead + (O,)).astype(dtype)
    return x, y, ([6, 2, 5, 1, 6] if lengths else None)


def torch_loss_and_grads(torch, model, x, y, lengths):
    tdt = torch.float64 if model.dtype == np.float64 else torch.float32
    lstm = torch.nn.LSTM(model.lstm.input_size, model.lstm.hidden_size, batch_first=True).to(tdt)
    lstm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.lstm.params.items()})
    lin = torch.nn.Linear(model.W.shape[1], model.W.shape[0]).to(tdt)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(model.W))
        lin.bias.copy_(torch.from_numpy(model.b))
    xt = torch.tensor(x, dtype=tdt)
    N, T = x.shape[:2]
    if lengths is None:
        out, _ = lstm(xt)
        lens = torch.full((N,), T)
    else:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        lens = torch.tensor(lengths)
        out, _ = lstm(pack_padded_sequence(xt, lens, batch_first=True, enforce_sorted=False))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    if model.head == "last":
        feats = out[torch.arange(N), lens - 1]
        z = lin(feats)
        yt = torch.tensor(y)
    else:
        mask = torch.arange(T)[None, :] < lens[:, None]
        z = lin(out)[mask]
        yt = torch.tensor(y)[mask]
    if model.loss == "mse":
        loss = torch.nn.functional.mse_loss(z, yt.to(tdt))
    elif model.loss == "bce":
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt.to(tdt))
    else:
        loss = torch.nn.functional.cross_entropy(z, yt)
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in lstm.named_parameters()}
    grads["head.weight"], grads["head.bias"] = lin.weight.grad.numpy(), lin.bias.grad.numpy()
    return loss.item(), grads


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("head", ["last", "all"])
@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
def test_heads_and_losses_match_torch(torch, head, loss, lengths, dtype):
    model = fastlstm.SequenceModel(3, 5, 4, head=head, loss=loss, dtype=dtype, seed=1)
    x, y, lens = problem(head, loss, dtype, lengths)
    model.zero_grad()
    ours, _ = model.forward_backward(x, y, lens)
    want, grads = torch_loss_and_grads(torch, model, x, y, lens)
    assert abs(ours - want) <= TOL[dtype] * max(1.0, abs(want))
    for k, g in grads.items():
        assert rel_err(model.grads[k], g) <= TOL[dtype], k
    assert abs(model.evaluate(x, y, lens) - want) <= TOL[dtype] * max(1.0, abs(want))


def test_losses_are_stable_for_huge_logits():
    model = fastlstm.SequenceModel(2, 3, 2, loss="bce", dtype=np.float64, seed=0)
    model.b[:] = [800.0, -800.0]
    x = np.zeros((3, 4, 2))
    y = np.array([[1.0, 0.0]] * 3)
    assert model.evaluate(x, y) < 1e-12
    model.loss = "ce"
    assert model.evaluate(x, np.zeros(3, int)) < 1e-12
    assert np.isfinite(model.evaluate(x, np.ones(3, int)))


def test_predict_links():
    x = np.random.default_rng(0).standard_normal((4, 5, 2)).astype(np.float32)
    p = fastlstm.SequenceModel(2, 3, 3, loss="ce", seed=0).predict(x)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    q = fastlstm.SequenceModel(2, 3, 2, head="all", loss="bce", seed=0).predict(x)
    assert q.shape == (4, 5, 2) and ((q > 0) & (q < 1)).all()


def test_fit_history_early_stopping_and_bptt():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12, 2)).astype(np.float32)
    y = x[:, :, :1].cumsum(axis=1) / 4
    m = fastlstm.SequenceModel(2, 8, 1, head="all", seed=0)
    opt = fastlstm.Adam(m, lr=1e-2)
    h = m.fit(x, y, opt, epochs=4, batch_size=16, validation=(x, y), progress=False, seed=0)
    assert len(h["loss"]) == len(h["val_loss"]) == 4 and h["steps"] == 16
    assert h["val_loss"][-1] < h["val_loss"][0]
    h2 = m.fit(x, y, opt, epochs=3, batch_size=16, progress=False, bptt=4)
    assert len(h2["loss"]) == 3 and h2["steps"] == 12
    stop = fastlstm.SequenceModel(2, 8, 1, head="all", seed=0)
    opt0 = fastlstm.SGD(stop, lr=0.0)                 # nothing improves
    h3 = stop.fit(x, y, opt0, epochs=10, validation=(x, y), patience=2, progress=False)
    assert h3["stopped_early"] == 3


def test_fit_stops_on_non_finite_loss():
    x = np.ones((8, 3, 2), np.float32)
    y = np.ones((8, 1), np.float32)
    m = fastlstm.SequenceModel(2, 4, 1, seed=0)
    opt = fastlstm.SGD(m, lr=1e30)
    with pytest.raises(FloatingPointError, match="the training loss became (nan|inf)"):
        m.fit(x, y, opt, epochs=5, batch_size=8, progress=False)


# -- checkpoints ----------------------------------------------------------------

def trained(steps, seed=0):
    rng = np.random.default_rng(seed)
    m = fastlstm.SequenceModel(2, 6, 1, num_layers=2, dropout=0.3, seed=seed)
    opt = fastlstm.Adam(m, lr=1e-2)
    data = [(rng.standard_normal((8, 5, 2)).astype(np.float32),
             rng.standard_normal((8, 1)).astype(np.float32)) for _ in range(10)]
    return m, opt, data


def test_checkpoint_round_trip_and_resume_is_bitwise(tmp_path):
    straight, opt, data = trained(0)
    for x, y in data:
        straight.train_step(x, y, opt)
    m, opt2, _ = trained(0)
    for x, y in data[:4]:
        m.train_step(x, y, opt2)
    path = tmp_path / "ck.npz"
    m.save(path, optimizer=opt2)
    m2, opt3 = fastlstm.load(path, with_optimizer=True)
    assert np.array_equal(m2.flat_params, m.flat_params)
    assert type(opt3) is fastlstm.Adam and opt3.steps == 4
    for x, y in data[4:]:
        m2.train_step(x, y, opt3)
    assert np.array_equal(m2.flat_params, straight.flat_params)
    assert not list(tmp_path.glob(".fastlstm-*"))            # no temporary file left


def corrupt_cases(path, tmp_path):
    good = path.read_bytes()
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}

    def write(name, arrs=None, raw=None):
        p = tmp_path / name
        if raw is not None:
            p.write_bytes(raw)
        else:
            np.savez(p, **arrs)
        return p

    cfg = json.loads(str(arrays["config"]))
    other = dict(arrays, config=np.array(json.dumps(dict(cfg, hidden_size=7))))
    missing = {k: v for k, v in arrays.items() if k != "param/head.bias"}
    shape = dict(arrays, **{"param/head.weight": np.zeros((1, 3), np.float32)})
    dtype = dict(arrays, **{"param/head.weight": arrays["param/head.weight"].astype(np.float64)})
    return {
        "truncated": (write("t.npz", raw=good[:len(good) // 2]),
                      "not a readable fastlstm checkpoint"),
        "garbage": (write("g.npz", raw=b"\x00garbage" * 100), "not a readable fastlstm checkpoint"),
        "missing": (write("m.npz", missing), r"parameters \['param/head.bias'\] do not match"),
        "shape": (write("s.npz", shape), r"param/head.weight is float32\(1, 3\), expected"),
        "dtype": (write("d.npz", dtype), r"param/head.weight is float64.*expected float32"),
        "config": (write("c.npz", other), r"param/weight_ih_l0 is float32\(24, 2\), expected "
                                          r"float32\(28, 2\)"),
    }


def test_corrupted_checkpoints_raise_and_load_nothing(tmp_path):
    m, opt, _ = trained(0)
    path = tmp_path / "ck.npz"
    m.save(path, optimizer=opt)
    for bad, msg in corrupt_cases(path, tmp_path).values():
        with pytest.raises(ValueError, match=msg):
            fastlstm.load(bad)
    with pytest.raises(FileNotFoundError):
        fastlstm.load(tmp_path / "absent.npz")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m, opt, _ = trained(0)
    path = tmp_path / "ck.npz"
    m.save(path)
    before = path.read_bytes()
    m.flat_params += 1

    def explode(*a, **k):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError, match="simulated"):
        m.save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".fastlstm-*"))


# -- bad input ---------------------------------------------------------------

def test_sequence_model_bad_input():
    with pytest.raises(ValueError, match="head must be one of"):
        fastlstm.SequenceModel(2, 3, 1, head="first")
    with pytest.raises(ValueError, match="loss must be one of"):
        fastlstm.SequenceModel(2, 3, 1, loss="hinge")
    m = fastlstm.SequenceModel(2, 3, 2, loss="ce", seed=0)
    opt = fastlstm.Adam(m)
    x = np.ones((4, 5, 2), np.float32)
    snap = m.flat_params.copy()
    with pytest.raises(TypeError, match="y must hold integer class indices"):
        m.train_step(x, np.zeros(4, np.float32), opt)
    with pytest.raises(ValueError,
                       match=r"y must hold class indices in \[0, 2\), got min 0 and max 2"):
        m.train_step(x, np.array([0, 1, 2, 0]), opt)
    with pytest.raises(ValueError, match=r"y must have shape \(4,\), got \(4, 1\)"):
        m.train_step(x, np.zeros((4, 1), int), opt)
    with pytest.raises(ValueError, match="opt was built for another model"):
        m.train_step(x, np.zeros(4, int), fastlstm.Adam(fastlstm.SequenceModel(2, 3, 2, loss="ce")))
    assert np.array_equal(m.flat_params, snap)


# -- the reference backend and the command -----------------------------------

def test_reference_backend_trains_like_fastlstm():
    x, y, lens = problem("last", "mse", np.float64, True)
    a = fastlstm.SequenceModel(3, 5, 4, dtype=np.float64, seed=2)
    b = fastlstm.SequenceModel(3, 5, 4, dtype=np.float64, seed=2, backend="reference")
    b.flat_params[:] = a.flat_params
    oa, ob = fastlstm.Adam(a, lr=1e-2), fastlstm.Adam(b, lr=1e-2)
    for _ in range(5):
        la, lb = a.train_step(x, y, oa, lengths=lens), b.train_step(x, y, ob, lengths=lens)
        assert abs(la - lb) <= 1e-10 * abs(lb)
    assert rel_err(a.flat_params, b.flat_params) <= 1e-10


def test_fastlstm_train_adding_meets_criterion_at_small_T():
    out = subprocess.run([sys.executable, "-m", "fastlstm", "train", "--task", "adding",
                          "--seq-len", "20", "--max-seconds", "120", "--json"],
                         capture_output=True, text=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, out.stderr
    for key in ("task", "seq_len", "steps", "sequences", "seconds", "test_mse",
                "test_accuracy", "criterion_met"):
        assert key in summary
    assert summary["criterion_met"] and summary["test_wrong"] <= 1 and summary["seq_len"] == 20


@pytest.mark.slow
def test_fastlstm_train_adding_T100_in_under_10_minutes():
    out = subprocess.run([sys.executable, "-m", "fastlstm", "train", "--task", "adding",
                          "--seq-len", "100", "--json"], capture_output=True, text=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["criterion_met"] and summary["seconds"] < 600


@pytest.mark.parametrize("task", ["sine", "article"])
def test_fastlstm_train_other_tasks(task):
    out = subprocess.run([sys.executable, "-m", "fastlstm", "train", "--task", task, "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["task"] == task and summary["criterion_met"]


def test_fastlstm_train_on_user_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8, 2)).astype(np.float32)
    y = (x[:, :, 0].sum(axis=1) > 0).astype(np.int64)          # classification
    np.savez(tmp_path / "d.npz", x=x, y=y, lengths=np.full(200, 8))
    out = subprocess.run([sys.executable, "-m", "fastlstm", "train", "--data",
                          str(tmp_path / "d.npz"), "--epochs", "15", "--json",
                          "--save", str(tmp_path / "m.npz")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.8
    assert fastlstm.load(tmp_path / "m.npz").loss == "ce"


def test_checkpoint_of_a_model_built_from_numpy_scalars(tmp_path):
    """The config keeps validated Python values: NumPy integers and floats (as
    sizes read from arrays are) save as JSON and load back to the same model."""
    m = fastlstm.SequenceModel(np.int64(2), np.int32(4), np.int64(1), seed=np.int64(3),
                               num_layers=np.int64(2), dropout=np.float32(0.25),
                               forget_bias=np.float64(1.0))
    opt = fastlstm.Adam(m)
    m.train_step(np.ones((3, 5, 2), np.float32), np.ones((3, 1), np.float32), opt)
    m.save(tmp_path / "m.npz", optimizer=opt)
    back, opt2 = fastlstm.load(tmp_path / "m.npz", with_optimizer=True)
    assert back.config == m.config and type(back.config["hidden_size"]) is int
    assert np.array_equal(back.flat_params, m.flat_params)


def test_one_version():
    from importlib.metadata import version
    assert version("fastlstm") == fastlstm.__version__


# -- the fused step (_step.train_step): the same training as the step made of calls ---------


def test_a_checkpoint_written_by_0_2_0_loads():
    """tests/data/v0.2.0.npz was written by fastlstm 0.2.0 (commit e3ad57b) after three
    Adam steps of a two-layer bidirectional model with a projection, peepholes and
    zoneout; v0.2.0-expected.npz holds what that version computed from it."""
    here = os.path.join(os.path.dirname(__file__), "data")
    want = np.load(os.path.join(here, "v0.2.0-expected.npz"))
    m, opt = fastlstm.load(os.path.join(here, "v0.2.0.npz"), with_optimizer=True)
    assert type(opt) is fastlstm.Adam and opt.steps == int(want["steps"]) == 3
    np.testing.assert_array_equal(m.flat_params, want["flat_params"])
    np.testing.assert_array_equal(opt.state["exp_avg"], want["exp_avg"])
    assert m.lstm.peephole and m.lstm.zoneout == 0.1 and m.lstm.proj_size == 4
    m.lstm.eval()
    np.testing.assert_allclose(m.predict(want["x"]), want["pred"], rtol=1e-12, atol=1e-14)
    m.lstm.train()
    m.train_step(want["x"], want["y"], opt)              # and it trains on
    assert opt.steps == 4
