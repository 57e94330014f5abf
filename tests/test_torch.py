"""fastlstm and the NumPy reference against torch.nn.LSTM autograd, same weights."""
import numpy as np
import pytest

import fastlstm

from helpers import RESULT_KEYS, TOL, random_problem, rel_err, run_fastlstm, run_reference


def run_torch(torch, prob, dtype):
    T, B, I = prob["x"].shape
    H = prob["h0"].shape[2]
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    lstm = torch.nn.LSTM(I, H).to(tdt)
    lstm.load_state_dict({k: torch.from_numpy(v) for k, v in prob["params"].items()})
    leaf = lambda a: torch.tensor(a, dtype=tdt, requires_grad=True)  # noqa: E731
    x, h0, c0 = leaf(prob["x"]), leaf(prob["h0"]), leaf(prob["c0"])
    y, (h_n, c_n) = lstm(x, (h0, c0))
    t = lambda a: torch.tensor(a, dtype=tdt)  # noqa: E731
    loss = (y * t(prob["dy"])).sum() + (h_n * t(prob["dh_n"])).sum() + (c_n * t(prob["dc_n"])).sum()
    loss.backward()
    out = dict(y=y, h_n=h_n, c_n=c_n, x=x.grad, h0=h0.grad, c0=c0.grad)
    out.update({k: p.grad for k, p in lstm.named_parameters()})
    return {k: v.detach().numpy() for k, v in out.items()}


SHAPES = [(1, 1, 2, 3), (3, 2, 2, 3), (12, 4, 7, 10), (30, 16, 32, 64)]


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_fastlstm_and_reference_match_torch(torch, shape, dtype):
    prob = random_problem(7, *shape, dtype)
    want = run_torch(torch, prob, dtype)
    got = run_fastlstm(prob, dtype)
    ref = run_reference(prob)
    for k in RESULT_KEYS:
        assert rel_err(got[k], want[k]) <= TOL[dtype], ("fastlstm", k)
        assert rel_err(ref[k], want[k]) <= TOL[dtype], ("reference", k)


@pytest.mark.torch
def test_torch_state_dict_loads_as_is(torch):
    t = torch.nn.LSTM(3, 5)
    m = fastlstm.LSTM(3, 5, dtype=np.float32)
    m.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    y = m.forward(x)[0]
    np.testing.assert_allclose(y, t(torch.from_numpy(x))[0].detach().numpy(), atol=1e-6)
    # and back: our state_dict loads into torch unchanged
    t2 = torch.nn.LSTM(3, 5)
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), t2.state_dict().values()))


def test_init_like_torch():
    m = fastlstm.LSTM(4, 16, seed=0)
    bound = 1 / np.sqrt(16)
    assert np.abs(m.flat_params).max() <= bound
    assert np.abs(m.flat_params).max() > 0.9 * bound
    assert np.array_equal(m.flat_params, fastlstm.LSTM(4, 16, seed=0).flat_params)
    assert not np.array_equal(m.flat_params, fastlstm.LSTM(4, 16, seed=1).flat_params)
    for k, v in m.params.items():
        assert np.shares_memory(v, m.flat_params), k
        assert np.shares_memory(m.grads[k], m.flat_grads), k
