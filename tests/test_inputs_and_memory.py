"""Valid input of every kind on every path (read-only, non-contiguous), and memory
that does not pile up when the shape changes from call to call."""
import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

import fastlstm


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _strided(a):
    """The same values, every axis reversed twice: a non-contiguous view."""
    b = np.empty(tuple(2 * n for n in a.shape), a.dtype)
    v = b[tuple(slice(None, None, 2) for _ in a.shape)]
    v[...] = a
    return v


# broadcast: one sequence for the whole batch (axis 1 of x, dy and the states), read-only
KINDS = {"readonly": _readonly, "strided": _strided,
         "broadcast": lambda a: np.broadcast_to(a[:, :1], a.shape)}

# (threads, T, B, I, H, options): unsplit (plans), split (split plans), stacked and
# bidirectional, a variant
LAYERS = [
    (1, 3, 1, 2, 3, {}),
    (2, 50, 32, 32, 64, {}),
    (2, 6, 4, 3, 5, dict(num_layers=2, bidirectional=True, proj_size=2)),
    (2, 40, 32, 16, 32, dict(zoneout=0.1, peephole=True)),
]


def _run(m, x, dy, state=None, dstate=None, lengths=None):
    m.set_rng_state(m.rng0)                  # the same masks every call (zoneout)
    y, (h, c) = m.forward(x, state, lengths)
    out = [y.copy(), h.copy(), c.copy()]
    dx, (dh, dc) = m.backward(dy, dstate)
    return out + [dx.copy(), dh.copy(), dc.copy(), m.flat_grads.copy()]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_every_path_takes_readonly_and_noncontiguous_inputs(case, kind):
    threads, T, B, I, H, opts = LAYERS[case]
    rng = np.random.default_rng(case)
    make = KINDS[kind]
    m = fastlstm.LSTM(I, H, dtype=np.float64, seed=0, threads=threads, **opts)
    m.rng0 = m.get_rng_state()
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, m.output_size))
    LD, P = m.num_layers * m.num_directions, m._P
    h0, c0 = rng.standard_normal((LD, B, P)), rng.standard_normal((LD, B, H))
    if kind == "broadcast":             # the same values, as ordinary arrays, for want
        x, dy, h0, c0 = (np.repeat(a[:, :1], B, 1) for a in (x, dy, h0, c0))
    lengths = np.full(B, T, np.int64)
    lengths[0] = max(T // 2, 1)
    for args in (dict(), dict(state=(h0, c0), dstate=(h0, c0), lengths=lengths)):
        for _ in range(3):                                         # plans made by now
            m.zero_grad()
            want = _run(m, x, dy, **args)
        given = {k: (make(v) if isinstance(v, np.ndarray) and k != "lengths" else v)
                 for k, v in args.items()}
        for key in ("state", "dstate"):
            if key in given:
                given[key] = tuple(make(a) for a in given[key])
        if "lengths" in given:
            given["lengths"] = _readonly(lengths)
        for _ in range(3):               # first call, plan, plan again
            m.zero_grad()
            got = _run(m, make(x), make(dy), **given)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_train_step_takes_readonly_data(threads):
    B, T = (1, 3) if threads == 1 else (32, 50)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, 4)).astype(np.float32)
    for head, loss, y in (("last", "mse", rng.standard_normal((B, 2)).astype(np.float32)),
                          ("last", "ce", rng.integers(0, 2, B)),
                          ("all", "bce", rng.random((B, T, 2)).astype(np.float32))):
        runs = []
        for make in (np.copy, _readonly):
            model = fastlstm.SequenceModel(4, 8, 2, head=head, loss=loss, seed=0,
                                           threads=threads)
            opt = fastlstm.Adam(model)
            losses = [model.train_step(make(x), make(y), opt) for _ in range(3)]
            losses.append(model.train_step(make(x), make(y), opt,
                                           lengths=_readonly(np.full(B, T))))
            runs.append((losses, model.flat_params.copy()))
        assert runs[0][0] == runs[1][0]
        np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_two_layers_stacked_by_hand():
    """A layer's output is a read-only view: the next layer takes it as it is."""
    rng = np.random.default_rng(1)
    a = fastlstm.LSTM(32, 64, seed=0, threads=2)
    b = fastlstm.LSTM(64, 16, seed=1, threads=2)
    x = rng.standard_normal((50, 32, 32)).astype(np.float32)
    for _ in range(3):
        y, _ = a.forward(x)
        z, _ = b.forward(y)
        dz = np.ones_like(z)
        dy, _ = b.backward(dz)
        a.backward(dy)
    assert np.isfinite(a.flat_grads).all()


def test_mmap_input(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 32, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    m = fastlstm.LSTM(16, 32, seed=0, threads=2)
    want = [m.forward(x)[0].copy() for _ in range(2)][-1]
    for _ in range(2):
        np.testing.assert_array_equal(m.forward(xm)[0], want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_old_workspaces_are_freed_when_T_grows(threads, with_lengths):
    """Without the cyclic collector: a plan and its record of the last forward must not
    hold each other (or the workspace they were made for) alive."""
    gc.collect()
    gc.disable()
    try:
        B = 32 if threads == 2 else 4
        m = fastlstm.LSTM(16, 32, seed=0, threads=threads)
        model = fastlstm.SequenceModel(16, 32, 1, seed=0, threads=threads)
        opt = fastlstm.SGD(model, lr=1e-3)
        refs = []
        for T in range(20, 60, 4):
            x = np.ones((T, B, 16), np.float32)
            lengths = np.full(B, T) if with_lengths else None
            for _ in range(2):                   # the second call makes the plans
                y, _ = m.forward(x, lengths=lengths)
                m.backward(np.ones_like(y))
                model.train_step(x.transpose(1, 0, 2), np.ones((B, 1), np.float32), opt,
                                 lengths=lengths)
            refs.append([weakref.ref(p.ws[0].flat) for p in m._parts + model.lstm._parts])
        alive = sum(r() is not None for rs in refs[:-1] for r in rs)
        assert alive == 0, f"{alive} workspaces of earlier shapes are still alive"
    finally:
        gc.enable()


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, numpy as np, fastlstm
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    threads, lengths = int(sys.argv[1]), sys.argv[2] == "1"
    B = 32 if threads == 2 else 8
    model = fastlstm.SequenceModel(8, 32, 1, seed=0, threads=threads)
    opt = fastlstm.Adam(model)
    rng = np.random.default_rng(0)
    def step(T):
        x = rng.standard_normal((B, T, 8)).astype(np.float32)
        y = rng.standard_normal((B, 1)).astype(np.float32)
        lens = rng.integers(1, T + 1, B) if lengths else None
        model.train_step(x, y, opt, lengths=lens)
    for T in range(5, 201):                  # every shape once: buffers at their largest
        step(T)
    for _ in range(1500):                    # then what a first spell of random shapes adds
        step(int(rng.integers(5, 201)))
    start = rss_mb()
    for _ in range(3000):
        step(int(rng.integers(5, 201)))
    print(start, rss_mb())
""")


@pytest.mark.parametrize("threads,lengths", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_resident_memory_flat_when_T_changes_every_step(threads, lengths):
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(threads), str(lengths)],
                         capture_output=True, text=True, check=True)
    start, end = map(float, out.stdout.split())
    assert end - start < 4.0, (start, end)


@pytest.mark.parametrize("head,loss", [("last", "mse"), ("all", "ce"), ("all", "mse")])
def test_predict_and_evaluate_run_a_large_x_in_blocks_of_rows(head, loss):
    """Past BLOCK_BYTES of workspace, predict and evaluate run x in blocks of rows: the
    same outputs and mean loss as in one block, and a workspace of one block."""
    rng = np.random.default_rng(0)
    N, T, I, O = 37, 9, 3, 4
    x = rng.standard_normal((N, T, I))
    lengths = rng.integers(1, T + 1, N)
    if head == "last":
        y = rng.standard_normal((N, O))
    else:
        y = rng.integers(0, O, (N, T)) if loss == "ce" else rng.standard_normal((N, T, O))
    whole = fastlstm.SequenceModel(I, 5, O, head=head, loss=loss, dtype=np.float64, seed=0)
    blocked = fastlstm.SequenceModel(I, 5, O, head=head, loss=loss, dtype=np.float64, seed=0)
    blocked.BLOCK_BYTES = 8 * blocked.lstm.workspace_bytes(T, 1)      # blocks of 8 rows
    for lens in (lengths, None):
        np.testing.assert_allclose(blocked.predict(x, lens), whole.predict(x, lens),
                                   rtol=1e-12, atol=1e-14)
        a, b = blocked.evaluate(x, y, lens), whole.evaluate(x, y, lens)
        assert abs(a - b) <= 1e-12 * abs(b), (a, b)
    assert blocked.lstm.last_lengths.shape == (N % 8,)                # the last block's rows
    assert blocked.lstm._part(0).ws[0].B == 8 and whole.lstm._part(0).ws[0].B == N
    with pytest.raises(ValueError, match="lengths"):                  # checked whole, first
        blocked.predict(x, lengths[:-1])
