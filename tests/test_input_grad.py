"""backward(dy, input_grad=False): no dx (the first layer skips its product where it
can), and everything else bitwise as with input_grad=True, on every path a backward
takes: the one-part plan, the batch split (plan and general path), stacked and
bidirectional layers, a last-step-only forward, segments (recompute), the split by
hidden units; and the torch module skips dx when its input needs no gradient."""
import numpy as np
import pytest

import fastlstm
from fastlstm._plans import ColumnTrainPlan, Plan, SplitPlan
from fastlstm._threads import usable_cores

# name: (layer options, T, B, I, H, forward keywords, the kind of plan the repeat takes)
CASES = {
    "plan": (dict(threads=1), 6, 3, 4, 5, {}, Plan),
    "split plan": (dict(threads=2), 50, 8, 16, 32, {}, SplitPlan),
    "layers bidirectional": (dict(num_layers=2, bidirectional=True, threads=1), 6, 3, 4, 5,
                             {}, None),
    "split layers": (dict(num_layers=2, dropout=0.3, threads=2), 50, 8, 16, 32, {}, None),
    "lengths": (dict(threads=1, batch_first=True), 6, 3, 4, 5, dict(lengths=[6, 2, 4]),
                None),
    "last only": (dict(threads=1), 6, 3, 4, 5, dict(return_sequences=False), None),
    "recompute": (dict(threads=1, recompute=2), 9, 3, 4, 5, {}, None),
    "units split": (dict(threads=2), 7, 1, 12, 128, {}, ColumnTrainPlan),
}


def _run(m, x, dy, input_grad, **kw):
    m.zero_grad()
    y, (h, c) = m.forward(x, **kw)
    dx, (dh0, dc0) = m.backward(dy, input_grad=input_grad)
    return (None if dx is None else dx.copy()), dh0.copy(), dc0.copy(), m.flat_grads.copy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", CASES)
def test_no_input_grad_changes_nothing_else(name, dtype):
    opts, T, B, I, H, kw, kind = CASES[name]
    if opts.get("threads", 1) > 1 and usable_cores() < 2:
        pytest.skip("needs two cores")        # the split paths run only on two threads
    m = fastlstm.LSTM(I, H, dtype=dtype, seed=1, **opts).train()
    rng = np.random.default_rng(2)
    shape = (B, T, I) if opts.get("batch_first") else (T, B, I)
    x = rng.standard_normal(shape).astype(dtype)
    D = 2 if opts.get("bidirectional") else 1
    dy_shape = (B, D * H) if kw.get("return_sequences") is False else shape[:2] + (D * H,)
    dy = rng.standard_normal(dy_shape).astype(dtype)
    if opts.get("dropout"):
        m._rng = np.random.default_rng(0)
    want = _run(m, x, dy, True, **kw)
    for _ in range(2):              # the first call may make a plan, the second takes it
        if opts.get("dropout"):     # the same masks
            m._rng = np.random.default_rng(0)
        got = _run(m, x, dy, False, **kw)
        assert got[0] is None
        for a, b in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(a, b)
    if kind is not None:
        assert type(m._last) is kind


def test_input_grad_must_be_a_boolean():
    m = fastlstm.LSTM(2, 3)
    x = np.zeros((3, 1, 2))
    m.forward(x)
    with pytest.raises(TypeError, match="input_grad"):
        m.backward(np.zeros((3, 1, 3)), input_grad="no")
    dx, _ = m.backward(np.zeros((3, 1, 3)))                  # the forward is still there
    assert dx.shape == (3, 1, 2)


def test_the_torch_module_skips_dx_for_data(monkeypatch):
    torch = pytest.importorskip("torch")
    import fastlstm.torch as ft
    calls = []
    real = fastlstm.LSTM.backward

    def spy(self, dy, dstate=None, input_grad=True):
        calls.append(input_grad)
        return real(self, dy, dstate=dstate, input_grad=input_grad)
    monkeypatch.setattr(fastlstm.LSTM, "backward", spy)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, dtype=torch.float64)
    m = ft.LSTM.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for mod in (ref, m):
        mod(x)[0].pow(2).sum().backward()
    assert calls == [False]
    for (name, p), q in zip(ref.named_parameters(), m.parameters()):
        np.testing.assert_allclose(q.grad.numpy(), p.grad.numpy(), rtol=0, atol=1e-12,
                                   err_msg=name)
    xg = x.clone().requires_grad_(True)
    m(xg)[0].pow(2).sum().backward()
    assert calls == [False, True] and xg.grad is not None
