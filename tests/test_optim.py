"""Optimizers and gradient clipping against torch.optim over 20 steps with the
same gradients."""
import numpy as np
import pytest

import fastlstm

from helpers import rel_err

TOL = {np.float64: 1e-10, np.float32: 1e-6}

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict()),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=3e-3, weight_decay=0.05)),
    ("RMSprop", dict()),
    ("RMSprop", dict(lr=1e-3, alpha=0.9, momentum=0.5, weight_decay=0.01)),
]


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_optimizer_matches_torch(torch, name, kw, dtype):
    model = fastlstm.LSTM(3, 4, dtype=dtype, seed=0)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    p = torch.tensor(model.flat_params.copy(), dtype=tdt, requires_grad=True)
    opt = getattr(fastlstm, name)(model, **kw)
    topt = getattr(torch.optim, name)([p], **kw)
    rng = np.random.default_rng(1)
    for _ in range(20):
        g = rng.standard_normal(model.flat_params.size).astype(dtype)
        model.flat_grads[:] = g
        p.grad = torch.tensor(g, dtype=tdt)
        opt.step()
        topt.step()
    assert rel_err(model.flat_params, p.detach().numpy()) <= TOL[dtype]


@pytest.mark.torch
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(torch, max_norm):
    model = fastlstm.LSTM(3, 4, dtype=np.float64, seed=0)
    g = np.random.default_rng(2).standard_normal(model.flat_grads.size)
    model.flat_grads[:] = g
    p = torch.zeros(g.size, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor(g)
    total = fastlstm.clip_grad_norm(model, max_norm)
    want = torch.nn.utils.clip_grad_norm_([p], max_norm)
    assert abs(total - float(want)) <= 1e-12 * float(want)
    assert rel_err(model.flat_grads, p.grad.numpy()) <= 1e-14


def test_optimizer_bad_input():
    m = fastlstm.LSTM(2, 3)
    with pytest.raises(TypeError, match="model must expose flat_params and flat_grads"):
        fastlstm.Adam(object())
    with pytest.raises(ValueError, match=r"lr must be a finite number in \[0.0, inf\)"):
        fastlstm.SGD(m, lr=-1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        fastlstm.SGD(m, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number in \[0.0, 1.0\)"):
        fastlstm.Adam(m, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"max_norm must be a finite number in \(0.0, inf\)"):
        fastlstm.clip_grad_norm(m, 0)
