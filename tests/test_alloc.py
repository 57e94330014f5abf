"""No allocation per step: after a warm-up, forward+backward at the same shapes
allocates nothing that grows with T or B (Numba's NRT and NumPy's heap)."""
import functools
import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, tracemalloc
    import numpy as np
    from numba.core.runtime import rtsys
    import fastlstm

    def measure(T, B, I=8, H=16, **opts):
        m = fastlstm.LSTM(I, H, dtype=np.float32, seed=0, **opts)
        x = np.ones((T, B, I), np.float32)
        dy = np.ones((T, B, m.output_size), np.float32)
        m.forward(x); m.backward(dy)                        # warm-up: sizes the workspace
        before = rtsys.get_allocation_stats().alloc
        tracemalloc.start()
        for _ in range(3):
            m.forward(x); m.backward(dy)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return dict(nrt=rtsys.get_allocation_stats().alloc - before, peak=peak,
                    parts=len(m._last.split))

    from numba import types
    from fastlstm import _spin
    from fastlstm._compile import entries, signature
    from fastlstm._kernels import layer_backward, layer_forward, rows_backward, rows_forward
    from fastlstm._spin import serve_rows
    # Numba wraps every array argument in a meminfo on entry; that is the only
    # NRT "allocation" a call may make (it holds no data).
    def arrays(*kernels):
        sigs = [signature(np.float32, k).args if k in entries() else k.signatures[0]
                for k in kernels]
        return sum(isinstance(a, types.Array) for s in sigs for a in s)
    wrappers = arrays(layer_forward, layer_backward)
    res = {f"{T}x{B}": measure(T, B) for T, B in [(5, 2), (100, 16), (200, 64)]}
    # every variant, in training mode (its masks drawn each call) and combined
    variants = dict(peephole=dict(peephole=True), layer_norm=dict(layer_norm=True),
                    zoneout=dict(zoneout=0.1, zoneout_cell=0.1),
                    rdrop=dict(recurrent_dropout=0.2),
                    stacked=dict(num_layers=2, bidirectional=True, dropout=0.1),
                    all=dict(peephole=True, layer_norm=True, zoneout=0.1, zoneout_cell=0.1,
                             recurrent_dropout=0.2, num_layers=2, bidirectional=True,
                             dropout=0.1))
    res["variants"] = {name: {f"{T}x{B}": measure(T, B, **opts)
                              for T, B in [(100, 16), (200, 64)]}
                       for name, opts in variants.items()}
    res["wrappers"] = 3 * wrappers          # per part of the batch (each calls the kernels)
    # A repeated one-layer call split across threads (_plans.SplitPlan): part 0 calls
    # rows_forward and rows_backward; each other part's command is one post, a wait
    # (a spell of spinning per 2 ms; at most three here) and, when its server had gone to
    # sleep, one entry into its serving loop.
    res["rows"] = 3 * arrays(rows_forward, rows_backward)
    res["per_command"] = (arrays(_spin.post) + 3 * arrays(_spin.spin_until_at_least)
                          + arrays(serve_rows))
    print(json.dumps(res))
""")


@functools.lru_cache(maxsize=1)
def _measure():
    env = dict(os.environ, NUMBA_NRT_STATS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _nrt_as_expected(res, r, plan):
    """r's NRT count is the kernel entries' argument wrappers and nothing else: exactly, or
    for a split plan (`plan`) within what its hand-offs may add (6 commands in 3 fwd+bwd
    per server), far below one allocation per step (T = 100 or 200, 3 calls)."""
    if r["parts"] == 1 or not plan:
        return r["nrt"] == res["wrappers"] * r["parts"]
    return res["rows"] <= r["nrt"] <= res["rows"] + 6 * (r["parts"] - 1) * res["per_command"]


def test_forward_backward_allocates_nothing_that_grows():
    res = _measure()
    tiny, small, large = res["5x2"], res["100x16"], res["200x64"]
    assert tiny["parts"] == 1 and large["parts"] == min(len(os.sched_getaffinity(0)), 64)
    for r in (tiny, small, large):
        assert _nrt_as_expected(res, r, plan=True), res
    # Python-side: only the small objects a call makes (views, and the hand-off to a
    # thread when the batch is split), a few KB, about the same at 100x16 as at 200x64
    # (whose arrays alone would be ~1 MB). With two threads the peak depends a little on
    # which of those objects happen to be alive at once: 6-8 KB in CI, hence the slack.
    assert large["peak"] < 16_000, res
    assert small["parts"] == large["parts"] and large["peak"] <= small["peak"] + 4096, res


def test_every_variant_allocates_nothing_that_grows():
    res = _measure()
    for name, got in res["variants"].items():
        small, large = got["100x16"], got["200x64"]
        for size, r in got.items():
            # "all" against the same stack without the variants (the reversals'
            # kernels wrap their arrays too); the others against the plain layer, split
            # plans (no masks to draw) within their hand-offs' allowance
            if name in ("all", "stacked"):
                plain = res["variants"]["stacked"][size]
                assert r["nrt"] == plain["nrt"] and r["parts"] == plain["parts"], (name, res)
            else:
                assert r["parts"] == res[size]["parts"], (name, res)
                assert _nrt_as_expected(res, r, plan=name in ("peephole", "layer_norm")), (
                    name, res)
        if name in ("all", "stacked"):
            # Two layers of two directions on two threads: more small objects in flight,
            # their peak 40-80 KB with the interleaving (measured), whatever T and B; one
            # (T, B, 4H) buffer at 200x64 alone is 3.3 MB.
            assert large["peak"] < 128_000, (name, res)
        else:
            assert large["peak"] < 24_000, (name, res)
            assert large["peak"] <= small["peak"] + 8192, (name, res)


def test_streamed_buffers_start_on_a_cache_line():
    """The kernels' buffers start on a 64-byte line (_shared.ALIGN): at NumPy's 16 bytes
    every AVX-512 load straddled two lines."""
    import numpy as np

    import fastlstm
    from fastlstm._shared import ALIGN, aligned_empty
    for n in (1, 7, 1000):
        for dt in (np.float32, np.float64, np.uint8):
            a = aligned_empty(n, dt)
            assert a.ctypes.data % ALIGN == 0 and a.shape == (n,) and a.dtype == dt
    assert aligned_empty((3, 5), np.float32).shape == (3, 5)
    model = fastlstm.SequenceModel(3, 8, 2, dtype=np.float32, seed=0)
    opt = fastlstm.Adam(model, lr=1e-3)
    lstm = fastlstm.LSTM(3, 8, seed=0)
    x = np.ones((20, 4, 3), lstm.dtype)
    y, _ = lstm.forward(x)
    lstm.backward(np.ones_like(y))
    ws = lstm._part(0).ws[0].flat
    for a in (model.flat_params, model.flat_grads, lstm.flat_params, lstm.flat_grads, ws,
              *opt.state.values()):
        assert a.ctypes.data % ALIGN == 0
