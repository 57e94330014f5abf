"""The spinning servers of split plans (_servers.Server), tested directly: a failing
job reaches its caller, a dead thread is never waited on, an idle server holds nothing,
and a burst of commands enters a job's loop once."""
import gc
import threading
import time
import weakref

import numpy as np
import pytest
from test_layers import CONFIGS, cfg_id, make_problem

import fastlstm
from fastlstm import _servers, _threads
from fastlstm._spin import DONE, FORWARD, JOB, SEQ, spin_until_at_least

from helpers import TOL, rel_err, run_ours, run_torch


def python_job(number, work, entries):
    """A serving loop written in Python, by the protocol serve_rows follows; each entry
    appends the number of commands it served to `entries`."""
    def serve(cell, spins):
        entries.append(0)
        done = int(cell[DONE])
        while True:
            seq = spin_until_at_least(cell, SEQ, done + 1, spins)
            if seq <= done or cell[JOB] != number:
                return
            work()
            entries[-1] += 1
            done = seq
            cell[DONE] = seq
    return serve


def test_a_failing_job_raises_in_the_caller():
    server = _servers.Server(1000)
    number = _servers.new_job()

    def work():
        raise ValueError("injected")
    seq = server.post(number, python_job(number, work, []), FORWARD)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="server thread failed") as info:
        server.wait(seq)
    assert isinstance(info.value.__cause__, ValueError)
    assert time.perf_counter() - t0 < 5
    assert not server.alive()


def test_a_dead_server_is_never_waited_on_and_is_replaced():
    servers = _servers.take_servers(1)
    assert servers is not None
    try:
        server = servers[0]
        number = _servers.new_job()

        def work():
            raise SystemExit               # the thread ends, whatever the exception
        seq = server.post(number, python_job(number, work, []), FORWARD)
        with pytest.raises(RuntimeError):
            server.wait(seq)
    finally:
        _servers.release_servers()
    again = _servers.take_servers(1)
    try:
        assert again[0] is not server and again[0].alive()
    finally:
        _servers.release_servers()


def test_no_pass_without_a_command_and_the_idle_server_drops_its_job():
    server = _servers.Server(int(1e6))            # spins long enough to span the burst
    number, entries, calls = _servers.new_job(), [], []
    job = python_job(number, lambda: calls.append(1), entries)
    for _ in range(20):
        server.wait(server.post(number, job, FORWARD))
    ref = weakref.ref(job)
    del job
    deadline = time.perf_counter() + 5
    while ref() is not None and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert len(calls) == 20 == sum(entries)
    assert 0 not in entries, entries               # no pass through the loop for nothing
    assert ref() is None, "an idle server still holds its job"


def test_a_deleted_models_buffers_are_freed():
    m = fastlstm.LSTM(32, 64, seed=0, threads=2)
    x = np.ones((50, 32, 32), np.float32)
    for _ in range(3):                            # the split plan and its servers
        y, _ = m.forward(x)
        m.backward(np.ones_like(y))
    assert len(m._last.split) == 2
    workspaces = [weakref.ref(p.ws[0].flat) for p in m._parts]
    del m, y
    time.sleep(0.05)                              # longer than a server's idle spell
    gc.collect()
    assert all(w() is None for w in workspaces)


def test_servers_are_given_back_by_the_thread_that_took_them():
    servers = _servers.take_servers(1)
    assert servers is not None
    def other_thread(call):
        out = []
        t = threading.Thread(target=lambda: out.append(call()))
        t.start()
        t.join()
        return out[0]

    other_thread(_servers.release_servers)         # not the taker: changes nothing
    assert other_thread(lambda: _servers.take_servers(1)) is None
    assert _servers.take_servers(1) == servers     # the taker may take them again (a call
    _servers.release_servers()                     # cut short kept them)
    assert other_thread(lambda: (_servers.take_servers(1), _servers.release_servers())[0])


def test_a_restore_the_main_thread_owes_is_not_lost_in_another_thread():
    """OpenBLAS takes a higher thread count back from the main thread only once the main
    thread lowered it. A main-thread call whose restore Ctrl-C cut short, then a split
    call in another thread: that thread's restore is ignored, and dropping the saved
    counts then left BLAS at one thread and the split limit at one for good."""
    from threadpoolctl import threadpool_info

    def blas():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    before, limit = blas(), _threads.blas_limit()
    token = object()
    _threads.enter_single_threaded_blas(token)     # a main-thread call ...
    _threads._inside.discard(token)                # ... whose restore was cut short
    m = fastlstm.LSTM(32, 64, seed=0)
    x = np.ones((50, 32, 32), np.float32)
    for _ in range(2):
        t = threading.Thread(target=lambda: m.forward(x))
        t.start()
        t.join()
    assert _threads.blas_limit() == limit          # the saved counts, not the 1s
    m.forward(x)                                   # the main thread's next call restores
    assert blas() == before
    assert len(m._last.split) == min(limit, _threads.usable_cores())


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CONFIGS[::3], ids=[cfg_id(c) for c in CONFIGS[::3]])
def test_batch_split_over_threads_matches_torch_and_one_thread(torch, monkeypatch, case, dtype):
    """Every size splits here (no work threshold): parts of 1 to 3 sequences run on
    their own threads and their gradients are summed."""
    from fastlstm import _threads
    monkeypatch.setattr(_threads, "SPLIT_WORK", 0)
    cfg, use_lengths = case
    lengths = [3, 7, 1, 5, 7] if use_lengths else None
    results = {}
    for threads in (1, 2, 3):
        m, prob = make_problem(11, 7, 5, 3, dict(cfg, threads=threads), dtype)
        results[threads] = run_ours(m, prob, lengths)
        assert len(m._last.split) == threads
    want = run_torch(torch, m, prob, lengths, cfg)
    for threads, got in results.items():
        for k in want:
            assert rel_err(got[k], want[k]) <= TOL[dtype], (threads, k)
    again = run_ours(m, prob, lengths)                # a fixed count repeats bitwise
    for k in again:
        assert np.array_equal(again[k], results[3][k]), k

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
def test_packed_products_and_blas_agree(monkeypatch, dtype):
    """An unsplit call whose BLAS may use two threads multiplies through BLAS; under a
    one-thread limit it uses the packed products (_gemm). H = 64, I = 64: every product
    packs in both dtypes; B = 7 leaves three rows past the micro-kernel's blocks."""
    from threadpoolctl import threadpool_limits

    from fastlstm import _threads
    monkeypatch.setattr(_threads, "SPLIT_WORK", 0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 7, 64)).astype(dtype)
    dy = rng.standard_normal((6, 7, 128)).astype(dtype)
    got = {}
    for limit in (2, 1):        # 2, not the default: under a one-thread BLAS (OPENBLAS_NUM_
        m = fastlstm.LSTM(64, 64, num_layers=2, bidirectional=True, dtype=dtype, seed=4,
                          threads=1)           # THREADS=1) both runs would be packed
        with threadpool_limits(limit):
            y = m.forward(x)[0].copy()
            dx = m.backward(dy)[0].copy()
        got[limit] = (m._last.one_thread, y, dx, m.flat_grads.copy())
    assert got[1][0] and not got[2][0]          # the two paths, each checked taken
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, b in zip(got[2][1:], got[1][1:]):
        assert rel_err(a, b) <= tol

def test_batch_split_keeps_dropout_masks(monkeypatch):
    """The masks are drawn for the whole batch before it is split: the same at any count."""
    from fastlstm import _threads
    monkeypatch.setattr(_threads, "SPLIT_WORK", 0)
    x = np.random.default_rng(0).standard_normal((6, 4, 3))
    ys = [fastlstm.LSTM(3, 5, num_layers=3, dropout=0.5, dtype=np.float64, seed=2,
                        threads=t).forward(x)[0].copy() for t in (1, 2)]
    np.testing.assert_allclose(ys[0], ys[1], rtol=1e-13, atol=1e-15)


def test_one_thread_means_one_thread_for_the_directions_too(monkeypatch):
    """threads=1 (or a BLAS limit of 1) also keeps a bidirectional layer's two
    directions on one thread, as it keeps the batch unsplit."""
    from threadpoolctl import threadpool_limits

    from fastlstm import _parts
    calls = []

    def pair(*fns):
        calls.append(len(fns))
        for fn in fns:
            fn()
    monkeypatch.setattr(_parts, "run_pair", pair)
    x = np.ones((100, 1, 128), np.float32)                # B=1: no batch split; work > 50M
    fastlstm.LSTM(128, 512, bidirectional=True, threads=1).forward(x)
    with threadpool_limits(limits=1, user_api="blas"):
        fastlstm.LSTM(128, 512, bidirectional=True).forward(x)
    assert calls == []
    fastlstm.LSTM(128, 512, bidirectional=True, threads=2).forward(x)    # and 2 means 2
    assert calls == [2]


def test_the_blas_limits_reach_the_blas_the_kernels_call():
    """The kernels' np.dot calls scipy's OpenBLAS, loaded with the first kernel (lazily);
    the split parts set every BLAS to one thread, so the controller must know that one
    even when it was made before any kernel loaded."""
    import subprocess
    import sys
    code = ("import numpy as np, fastlstm\n"
            "from fastlstm import _threads\n"
            "from threadpoolctl import threadpool_info\n"
            "m = fastlstm.LSTM(16, 32, seed=0, threads=2)\n"
            "_threads.blas_limit()          # the controller, before any kernel loads\n"
            "y, _ = m.forward(np.ones((50, 64, 16), np.float32))\n"
            "seen = sorted(lib.filepath for lib in _threads._state.blas)\n"
            "loaded = sorted(i['filepath'] for i in threadpool_info() if i['user_api'] == 'blas')\n"
            "assert any('scipy' in p for p in loaded), loaded\n"
            "assert seen == loaded, (seen, loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
