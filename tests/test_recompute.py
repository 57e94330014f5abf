"""recompute=K: the backward recomputes each segment's forward from its kept state,
and its results are bitwise those of keeping every step; a forward that keeps nothing
(evaluation) holds memory that does not grow with T."""
import tracemalloc

import numpy as np
import pytest

import fastlstm
from fastlstm import _threads

DTYPES = (np.float32, np.float64)


def _fwd_bwd(options, x, dy, lengths=None, state=None, dstate=None, calls=2):
    """Every result of `calls` forward+backward passes (the second runs a shape the model
    has seen: the plans' path where there are plans), as copies."""
    m = fastlstm.LSTM(x.shape[2], options.pop("H"), seed=3, dtype=x.dtype, **options)
    out = []
    for _ in range(calls):
        y, (h_n, c_n) = m.forward(x, state=state, lengths=lengths)
        out += [np.array(a) for a in (y, h_n, c_n)]
        dx, (dh0, dc0) = m.backward(dy, dstate)
        out += [np.array(a) for a in (dx, dh0, dc0, m.flat_grads)]
    return out, m


#: (T, B, I, options): layers, directions, lengths, projection, dropout, clip, every
#: variant, the batch split over two threads, and sizes on both kinds of the backward's
#: products (packed and BLAS, whose chunks differ)
GRID = [
    (120, 3, 3, dict(H=8)),
    (120, 3, 3, dict(H=8, num_layers=2, dropout=0.3)),
    (90, 4, 5, dict(H=8, bidirectional=True, lengths=True)),
    (90, 2, 4, dict(H=12, proj_size=5, num_layers=2, bidirectional=True)),
    (100, 3, 4, dict(H=8, cell_clip=0.5, forget_bias=1.0)),
    (80, 3, 4, dict(H=8, peephole=True, layer_norm=True, lengths=True)),
    (80, 3, 4, dict(H=8, zoneout=0.2, zoneout_cell=0.1, recurrent_dropout=0.25)),
    (80, 3, 4, dict(H=8, peephole=True, zoneout=0.2, proj_size=3, batch_first=True)),
    (300, 40, 16, dict(H=64, threads=2)),
    (200, 40, 16, dict(H=64, threads=2, lengths=True, layer_norm=True)),
    (60, 8, 16, dict(H=256, threads=1)),
    (40, 2, 32, dict(H=512, threads=2, num_layers=2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", range(len(GRID)))
def test_recompute_is_bitwise_keeping_every_step(case, dtype, monkeypatch):
    # against None on the batch split, as the segments run (a training call that splits
    # the hidden units instead, see _columns_train, agrees to rounding)
    monkeypatch.setattr(_threads, "TRAIN_COLUMN_BYTES", 1 << 62)
    T, B, I, opts = GRID[case]
    opts = dict(opts)
    rng = np.random.default_rng(case)
    lengths = rng.integers(T // 3, T + 1, B) if opts.pop("lengths", False) else None
    if lengths is not None:
        lengths[0] = T
    bf = opts.get("batch_first", False)
    x = rng.standard_normal((B, T, I) if bf else (T, B, I)).astype(dtype)
    D = 2 if opts.get("bidirectional") else 1
    P = opts.get("proj_size") or opts["H"]
    L = opts.get("num_layers", 1)
    dy = rng.standard_normal((B, T, D * P) if bf else (T, B, D * P)).astype(dtype)
    state = (rng.standard_normal((L * D, B, P)).astype(dtype),
             rng.standard_normal((L * D, B, opts["H"])).astype(dtype))
    dstate = tuple(rng.standard_normal(a.shape).astype(dtype) for a in state)
    for st, ds in ((None, None), (state, dstate)):
        want, _ = _fwd_bwd(dict(opts), x, dy, lengths, st, ds)
        for K in (1, 7, "sqrt", T // 4):
            got, m = _fwd_bwd(dict(opts, recompute=K), x, dy, lengths, st, ds)
            assert m.last_segment_steps is not None or K == T // 4, K
            for i, (a, b) in enumerate(zip(got, want)):
                assert np.array_equal(a, b), (K, i, float(np.max(np.abs(a - b))))


def test_segments_are_whole_chunks_of_the_backward_and_K_above_T_is_one():
    m = fastlstm.LSTM(3, 8, recompute=10, dtype=np.float64, threads=1)
    x = np.ones((1000, 2, 3))
    m.forward(x)
    K = m.last_segment_steps
    assert K >= 10 and K % 10 != 1        # rounded up to the chunk, a few steps or more
    m.backward(np.ones((1000, 2, 8)))
    big = fastlstm.LSTM(3, 8, recompute=5000, dtype=np.float64)
    big.forward(x)
    assert big.last_segment_steps is None      # one segment: the path that keeps all


@pytest.mark.parametrize("value", [0, -3, 2.5, "sqr", "SQRT", True, [4]])
def test_bad_recompute_values_name_the_option(value):
    with pytest.raises(ValueError, match="recompute must be None .*'sqrt', got"):
        fastlstm.LSTM(3, 8, recompute=value)


def test_an_evaluation_forward_keeps_nothing_and_cannot_be_differentiated():
    m = fastlstm.LSTM(3, 8, seed=0).eval()
    x = np.ones((20, 2, 3), np.float32)
    y = np.array(m.forward(x)[0])
    with pytest.raises(RuntimeError, match="evaluation mode .*keep=True"):
        m.backward(np.ones_like(y))
    m.forward(x, keep=True)
    m.backward(np.ones_like(y))               # asked to keep: it can
    m.train()
    m.forward(x, keep=False)
    with pytest.raises(RuntimeError, match="keeps nothing"):
        m.backward(np.ones_like(y))


@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, bidirectional=True)])
def test_a_long_evaluation_forward_runs_in_segments_with_the_same_outputs(options):
    rng = np.random.default_rng(1)
    full = fastlstm.LSTM(4, 16, seed=2, dtype=np.float64, **options)
    m = fastlstm.LSTM(4, 16, seed=2, dtype=np.float64, **options).eval()
    m.EVAL_SEGMENT_BYTES = 64 << 10            # a few dozen steps a segment
    x = rng.standard_normal((700, 3, 4))
    lengths = [700, 350, 1]
    for lens in (None, lengths):
        y, (h, c) = full.forward(x, lengths=lens)         # training: keeps all
        want = [np.array(a) for a in (y, h, c)]
        y, (h, c) = m.forward(x, lengths=lens)
        assert m.last_segment_steps is not None and m.last_segment_steps < 700
        for a, b in zip([y, h, c], want):
            assert np.array_equal(a, b)


def test_the_memory_of_an_evaluation_forward_does_not_grow_with_T():
    """Traced NumPy allocations beyond y (and the int lengths) at T and at 10 T: the
    same bound, far below what keeping every step would take."""
    m = fastlstm.LSTM(16, 64, seed=0).eval()
    B = 8

    def extra(T):
        x = np.zeros((T, B, 16), np.float32)
        m.forward(x[:5])                       # compiled and warmed, outside the trace
        tracemalloc.start()
        try:
            y = m.forward(x)[0]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak - y.nbytes

    small, large = extra(20_000), extra(200_000)
    assert large < 24 << 20, large                       # the target: <= 50 MB beyond x, y
    assert large < small + (2 << 20), (small, large)     # not growing with T
    assert m.workspace_bytes(200_000, B) > 40 * large    # keeping every step: ~2 GB


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("opts", [dict(H=8), dict(H=8, bidirectional=True, num_layers=2),
                                  dict(H=64, threads=2, batch_first=True),
                                  dict(H=8, proj_size=3, bidirectional=True, zoneout=0.1)])
def test_the_last_outputs_only_are_each_sequences_last_step_and_bitwise(opts, dtype):
    """forward(return_sequences=False): y[len - 1] of every sequence; its backward is that
    of dy zero but at those steps; in segments neither keeps the last layer's T steps."""
    T, B, I = 150, 40 if opts.get("threads") else 3, 4
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    bf = opts.get("batch_first", False)
    x = rng.standard_normal((B, T, I) if bf else (T, B, I)).astype(dtype)
    full = fastlstm.LSTM(I, opts["H"], seed=4, dtype=dtype,
                         **{k: v for k, v in opts.items() if k != "H"})
    y, _ = full.forward(x, lengths=lengths)
    yt = y.transpose(1, 0, 2) if bf else y
    want_last = np.array(yt[lengths - 1, np.arange(B)])
    g = rng.standard_normal(want_last.shape).astype(dtype)
    dy = np.zeros_like(yt)
    dy[lengths - 1, np.arange(B)] = g
    dx_want = np.array(full.backward(dy.transpose(1, 0, 2) if bf else dy)[0])
    grads_want = full.flat_grads.copy()
    for K in (None, 9, "sqrt"):
        m = fastlstm.LSTM(I, opts["H"], seed=4, dtype=dtype, recompute=K,
                          **{k: v for k, v in opts.items() if k != "H"})
        rng_state = m.get_rng_state()
        for _ in range(2):            # the second call at a shape: the plans' path, if any
            m.zero_grad()
            m.set_rng_state(rng_state)          # zoneout's masks: the full model's draw
            last, _ = m.forward(x, lengths=lengths, return_sequences=False)
            assert (K is None) == (m.last_segment_steps is None)
            assert np.array_equal(last, want_last)
            dx, _ = m.backward(g)
            assert np.array_equal(dx, dx_want), K
            assert np.array_equal(m.flat_grads, grads_want), K
        with pytest.raises(ValueError, match="dy"):
            m.backward(np.zeros((T, B, g.shape[1]), dtype))


def test_a_sequence_model_with_recompute_trains_bitwise_as_without():
    """forward_backward, train_step (Adam) and predict: the same numbers, segments or not."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 200, 3)).astype(np.float32)
    y = rng.standard_normal((6, 2)).astype(np.float32)
    runs = []
    for K in (None, 16, "sqrt"):
        m = fastlstm.SequenceModel(3, 8, 2, seed=1, num_layers=2, recompute=K)
        opt = fastlstm.Adam(m, lr=1e-2)
        losses = [m.train_step(x, y, opt) for _ in range(3)]
        assert (K is None) == (m.lstm.last_segment_steps is None)
        runs.append((losses, m.flat_params.copy(), m.predict(x)))
    for losses, params, pred in runs[1:]:
        assert losses == runs[0][0]
        assert np.array_equal(params, runs[0][1]) and np.array_equal(pred, runs[0][2])


def test_fastlstm_train_takes_recompute(tmp_path):
    from fastlstm import cli
    with pytest.raises(SystemExit):
        cli.main(["train", "--task", "sine", "--recompute", "sqr"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--task", "article", "--recompute", "4"])    # not a SequenceModel


def test_fit_with_truncated_bptt_and_data_parallel_are_bitwise_with_recompute():
    """fit over chunks of bptt steps (the state carried, the gradient cut), and a
    DataParallel step (one process): the same parameters with and without recompute."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 240, 3)).astype(np.float32)
    y = rng.standard_normal((8, 240, 2)).astype(np.float32)
    got = []
    for K in (None, 12):
        m = fastlstm.SequenceModel(3, 8, 2, head="all", seed=1, recompute=K)
        opt = fastlstm.Adam(m, lr=1e-2)
        m.fit(x, y, opt, epochs=2, batch_size=4, bptt=80, progress=False)
        got.append(m.flat_params.copy())
    assert np.array_equal(got[0], got[1])
    pytest.importorskip("mpi4py")
    from fastlstm.distributed import DataParallel
    got = []
    for K in (None, "sqrt"):
        m = fastlstm.SequenceModel(3, 8, 2, seed=1, recompute=K)
        dp = DataParallel(m)
        opt = fastlstm.Adam(m, lr=1e-2)
        for _ in range(2):
            dp.train_step(x, y[:, -1], opt)
        got.append(m.flat_params.copy())
    assert np.array_equal(got[0], got[1])


def test_the_torch_module_takes_recompute_with_the_same_gradients():
    torch = pytest.importorskip("torch")
    import fastlstm.torch as ft
    torch.manual_seed(0)
    full = ft.LSTM(3, 8, num_layers=2, dtype=torch.float64)
    seg = ft.LSTM(3, 8, num_layers=2, dtype=torch.float64, recompute=7)
    seg.load_state_dict(full.state_dict())
    x = torch.randn(100, 4, 3, dtype=torch.float64)
    grads = []
    for m in (full, seg):
        xi = x.clone().requires_grad_(True)
        y, (h, c) = m(xi)
        (y.sum() + h.sum()).backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with torch.no_grad():                    # keeps nothing: the same outputs
        assert torch.equal(full(x)[0], seg(x)[0])


def test_read_only_and_other_dtype_inputs_in_segments():
    """The segments' entries take the model's dtype and no read-only array: such inputs
    (np.broadcast_to, a memory map, float64 into float32) are copied, with the results of
    ordinary ones."""
    x = np.random.default_rng(3).standard_normal((200, 2, 3)).astype(np.float32)
    ro = x.copy()
    ro.flags.writeable = False
    m = fastlstm.LSTM(3, 8, seed=0).eval()
    m.EVAL_SEGMENT_BYTES = 1 << 12
    want = np.array(m.forward(x)[0])
    assert m.last_segment_steps is not None
    assert np.array_equal(m.forward(ro)[0], want)
    assert np.array_equal(m.forward(x.astype(np.float64))[0], want)
    r = fastlstm.LSTM(3, 8, seed=0, recompute=5)
    y, _ = r.forward(ro)
    dy = np.ones_like(y)
    dy.flags.writeable = False
    dx_ro = np.array(r.backward(dy)[0])
    r.forward(x)
    assert np.array_equal(np.array(r.backward(np.ones_like(y))[0]), dx_ro)


def test_a_recompute_or_evaluation_forward_too_large_names_x():
    """In segments the workspace no longer grows with T, but x's copy, dx and each layer's
    output do: refused before anything is allocated, naming x's shape."""
    x = np.broadcast_to(np.float32(1), (10 ** 9, 10 ** 4, 2))     # no memory behind it
    for m in (fastlstm.LSTM(2, 3, recompute="sqrt"), fastlstm.LSTM(2, 3).eval()):
        with pytest.raises(ValueError, match=r"the workspace for T=1000000000, B=10000 "
                                             r"\(x's shape\) would need [0-9.e+]+ GiB"):
            m.forward(x)
