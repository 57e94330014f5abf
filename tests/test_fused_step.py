"""The fused training step (fastlstm._step.train_step): SequenceModel takes it when
its LSTM has a plan; it must train exactly as the step made of separate calls."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastlstm


def test_train_step_allocates_nothing():
    script = """
import json, tracemalloc, numpy as np, fastlstm
from numba.core.runtime import rtsys
def measure(N, T):
    m = fastlstm.SequenceModel(3, 8, 2, head="all", loss="mse", seed=0)
    opt = fastlstm.Adam(m)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, T, 3)).astype(np.float32)
    y = rng.standard_normal((N, T, 2)).astype(np.float32)
    lengths = np.full(N, T)
    lengths[0] = 1
    for _ in range(2):      # clip_norm so small that every step clips: the same calls at both sizes
        m.train_step(x, y, opt, lengths=lengths, clip_norm=1e-6)
    before = rtsys.get_allocation_stats().alloc
    tracemalloc.start()
    for _ in range(3):
        m.train_step(x, y, opt, lengths=lengths, clip_norm=1e-6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dict(nrt=rtsys.get_allocation_stats().alloc - before, peak=peak,
                parts=len(m.lstm._last.split))
# both sizes large enough to split the batch over the cores (the same calls at both)
print(json.dumps({"small": measure(48, 150), "large": measure(64, 200)}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=dict(os.environ, NUMBA_NRT_STATS="1")).stdout
    res = json.loads(out.strip().splitlines()[-1])
    # NRT: only Numba's per-argument wrappers, the same count at both sizes.
    assert res["small"]["parts"] == res["large"]["parts"], res
    assert res["small"]["nrt"] == res["large"]["nrt"], res
    # NumPy: no buffer that grows with N or T (200x64 steps of data would be ~100 KB+);
    # slack for the thread hand-off's objects, whose peak varies with the interleaving.
    assert res["large"]["peak"] <= res["small"]["peak"] + 4096, res
    assert res["large"]["peak"] < 40_000, res

FUSED_OPTIMIZERS = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=3e-3)),
    ("RMSprop", dict(lr=1e-2, momentum=0.5)),
]

@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
@pytest.mark.parametrize("opt_name, hyper", FUSED_OPTIMIZERS)
@pytest.mark.parametrize("clip_norm", [None, 0.05])
def test_fused_step_trains_as_the_step_made_of_calls(loss, opt_name, hyper, clip_norm):
    rng = np.random.default_rng(7)
    N, T, I, O = 5, 4, 3, 3
    x = rng.standard_normal((N, T, I))
    if loss == "ce":
        y = rng.integers(0, O, N).astype(np.int32)          # cast to int64 on the way in
    elif loss == "bce":
        y = rng.integers(0, 2, (N, O)).astype(np.float64)
    else:
        y = rng.standard_normal((N, 2 * O))[:, ::2]          # not contiguous
    runs = []
    for lengths in (None, np.full(N, T)):       # lengths given: the step made of calls
        m = fastlstm.SequenceModel(I, 6, O, loss=loss, dtype=np.float64, seed=1,
                                   cell_clip=0.9)
        opt = getattr(fastlstm, opt_name)(m, **hyper)
        losses = [m.train_step(x, y, opt, lengths=lengths, clip_norm=clip_norm)
                  for _ in range(4)]
        assert bool(m._steps) == (lengths is None)            # the fused path ran
        runs.append((losses, m.flat_params.copy(), m.flat_grads.copy(), opt.steps,
                     [s.copy() for s in opt.state.values()]))
    (l1, p1, g1, s1, st1), (l2, p2, g2, s2, st2) = runs
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    np.testing.assert_allclose(p1, p2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-14)
    assert s1 == s2
    for a, b in zip(st1, st2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

def test_fused_step_leaves_the_model_as_a_forward_would(torch):
    """After a fused step the LSTM's workspace holds that step's forward: its
    backward and the model's evaluate work as after the step made of calls."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 2)).astype(np.float32)
    y = rng.standard_normal((4, 1)).astype(np.float32)
    m = fastlstm.SequenceModel(2, 3, 1, seed=0)
    opt = fastlstm.Adam(m, lr=1e-2)
    for _ in range(3):
        m.train_step(x, y, opt)
    assert m._steps
    lstm = torch.nn.LSTM(2, 3, batch_first=True)
    lstm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in m.lstm.state_dict().items()})
    head = torch.nn.Linear(3, 1)
    head.load_state_dict({"weight": torch.from_numpy(m.W.copy()),
                          "bias": torch.from_numpy(m.b.copy())})
    want = torch.nn.functional.mse_loss(head(lstm(torch.from_numpy(x))[0][:, -1]),
                                        torch.from_numpy(y)).item()
    assert abs(m.evaluate(x, y) - want) < 1e-5 * max(1.0, abs(want))
    m.lstm.forward(x)
    dx, _ = m.lstm.backward(np.ones((4, 5, 3), np.float32))
    assert np.isfinite(dx).all()

def test_fused_step_refuses_bad_input_and_changes_nothing():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 2)).astype(np.float32)
    y = rng.integers(0, 3, 4)
    m = fastlstm.SequenceModel(2, 3, 3, loss="ce", seed=0)
    opt = fastlstm.Adam(m)
    m.train_step(x, y, opt)
    m.train_step(x, y, opt)
    before = (m.flat_params.copy(), opt.steps)
    with pytest.raises(ValueError, match="class indices"):
        m.train_step(x, np.array([0, 1, 2, 3]), opt)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        m.train_step(x.astype(np.int64), y, opt)
    np.testing.assert_array_equal(m.flat_params, before[0])
    assert opt.steps == before[1]

@pytest.mark.parametrize("options", [dict(proj_size=2), dict(peephole=True, layer_norm=True),
                                     dict(proj_size=2, peephole=True, forget_bias=1.0)])
def test_fused_step_with_layer_options(options):
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((3, 5, 2)), rng.standard_normal((3, 1))
    runs = []
    for lengths in (None, np.full(3, 5)):
        m = fastlstm.SequenceModel(2, 4, 1, dtype=np.float64, seed=2, **options)
        opt = fastlstm.Adam(m, lr=1e-2)
        losses = [m.train_step(x, y, opt, lengths=lengths, clip_norm=0.5) for _ in range(3)]
        assert bool(m._steps) == (lengths is None)
        runs.append((losses, m.flat_params.copy()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-12, atol=1e-14)
