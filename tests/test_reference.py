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


def variant_problem(seed, T, B, I, H, variant):
    """A problem for the reference's variants: random parameters (LN away from its
    initialisation) and masks, as keyword arguments of reference.forward."""
    rng = np.random.default_rng(seed)
    prob = random_problem(seed, T, B, I, H, np.float64)
    opts = {}
    if variant in ("peephole", "all"):
        prob["params"].update({f"weight_c{g}_l0": rng.standard_normal(H) for g in "ifo"})
    if variant in ("layer_norm", "all"):
        prob["params"].update({f"{n}_l0": rng.standard_normal(H if n.startswith("ln_c")
                                                              else 4 * H)
                               for n in reference.LN_NAMES})
    if variant in ("zoneout", "all"):
        opts["zoneout"] = ((rng.random((T, B, H)) < 0.3) * 1.0, (rng.random((T, B, H)) < 0.4) * 1.0)
    if variant in ("rdrop", "all"):
        opts["recurrent_mask"] = (rng.random((B, H)) >= 0.3) / 0.7
    if variant == "all":
        opts["cell_clip"], opts["lengths"] = 0.9, [1, T, T - 1]
    return prob, opts


def variant_loss_and_grads(prob, opts):
    p = {k[:-3]: v for k, v in prob["params"].items()}
    kw = dict(opts)
    if "weight_ci" in p:
        kw["peephole"] = (p["weight_ci"], p["weight_cf"], p["weight_co"])
    if "ln_ih_weight" in p:
        kw["layer_norm"] = {n: p[n] for n in reference.LN_NAMES}
    y, (h_n, c_n), cache = reference.forward(prob["x"], prob["h0"][0], prob["c0"][0],
                                             *[p[n[:-3]] for n in NAMES], **kw)
    loss = np.sum(prob["dy"] * y) + np.sum(prob["dh_n"][0] * h_n) + np.sum(prob["dc_n"][0] * c_n)
    dx, (dh0, dc0), g = reference.backward(prob["dy"], prob["dh_n"][0], prob["dc_n"][0], cache)
    grads = dict(x=dx, h0=dh0[None], c0=dc0[None], **{n + "_l0": v for n, v in g.items()})
    return loss, grads


@pytest.mark.parametrize("variant", ["peephole", "layer_norm", "zoneout", "rdrop", "all"])
def test_reference_variants_match_finite_differences(variant):
    prob, opts = variant_problem(5, 4, 3, 2, 3, variant)
    _, grads = variant_loss_and_grads(prob, opts)
    assert set(grads) == {"x", "h0", "c0"} | set(prob["params"])
    eps = 1e-6
    for target, analytic in grads.items():
        arr = prob["params"][target] if target in prob["params"] else prob[target]
        flat, numeric = arr.reshape(-1), np.empty(arr.size)
        for k in range(flat.size):
            keep = flat[k]
            flat[k] = keep + eps
            up = variant_loss_and_grads(prob, opts)[0]
            flat[k] = keep - eps
            down = variant_loss_and_grads(prob, opts)[0]
            flat[k] = keep
            numeric[k] = (up - down) / (2 * eps)
        assert rel_err(analytic.reshape(-1), numeric) <= 1e-6, target
