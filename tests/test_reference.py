"""The NumPy reference against central finite differences in float64."""
import numpy as np
import pytest

from fastlstm import reference

from helpers import random_problem, rel_err

NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def loss_and_grads(prob):
    """A scalar loss L = sum(dy * y) + sum(dh_n * h_n) + sum(dc_n * c_n) and its gradients."""
    p = prob["params"]
    args = [prob["x"], prob["h0"][0], prob["c0"][0]] + [p[n] for n in NAMES]
    y, (h_n, c_n), cache = reference.forward(*args)
    loss = np.sum(prob["dy"] * y) + np.sum(prob["dh_n"][0] * h_n) + np.sum(prob["dc_n"][0] * c_n)
    dx, (dh0, dc0), g = reference.backward(prob["dy"], prob["dh_n"][0], prob["dc_n"][0], cache)
    grads = dict(x=dx, h0=dh0[None], c0=dc0[None],
                 **{n: g[n[:-3]] for n in NAMES})
    return loss, grads


def numeric_grad(prob, target, eps=1e-6):
    arr = prob["params"][target] if target in prob["params"] else prob[target]
    out = np.empty_like(arr)
    flat, gflat = arr.reshape(-1), out.reshape(-1)
    for k in range(flat.size):
        keep = flat[k]
        flat[k] = keep + eps
        up = loss_and_grads(prob)[0]
        flat[k] = keep - eps
        down = loss_and_grads(prob)[0]
        flat[k] = keep
        gflat[k] = (up - down) / (2 * eps)
    return out


@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (3, 2, 2, 3), (5, 3, 4, 5)],
                         ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("target", ("x", "h0", "c0") + NAMES)
def test_reference_matches_finite_differences(shape, target):
    prob = random_problem(1, *shape, np.float64)
    _, grads = loss_and_grads(prob)
    assert rel_err(grads[target], numeric_grad(prob, target)) <= 1e-6


def test_reference_uses_h0_c0_at_t0():
    """The article reads C[t-1] at t=0 from the end of the array; the first step
    must see c0 and h0, so changing them changes y[0]."""
    prob = random_problem(2, 4, 2, 3, 3, np.float64)
    p = prob["params"]
    args = [p[n] for n in NAMES]
    y1 = reference.forward(prob["x"], prob["h0"][0], prob["c0"][0], *args)[0]
    y2 = reference.forward(prob["x"], prob["h0"][0], prob["c0"][0] + 1.0, *args)[0]
    assert not np.allclose(y1[0], y2[0])
