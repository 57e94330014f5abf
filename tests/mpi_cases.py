"""Data-parallel cases, run by tests/test_distributed.py as
``mpiexec -n N python tests/mpi_cases.py CASE``; each prints "ok" on rank 0 or fails."""
import hashlib
import json
import sys

import numpy as np
from mpi4py import MPI

import fastlstm
from fastlstm.distributed import DataParallel

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
TOL = 1e-10


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def same_everywhere(a):
    digests = comm.allgather(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())
    assert len(set(digests)) == 1, f"ranks differ: {digests}"


def batch(rng, N, T, loss, head, with_lengths, O=3):
    x = rng.standard_normal((N, T, 2))
    lengths = rng.integers(1, T + 1, N) if with_lengths else None
    lead = (N,) if head == "last" else (N, T)
    y = rng.integers(0, O, lead) if loss == "ce" else rng.random(lead + (O,))
    return x, y, lengths


def steps_match_one_process():
    """10 Adam steps on uneven shards equal one process on the global batch."""
    worst = 0.0
    for loss in ("mse", "bce", "ce"):
        for head in ("last", "all"):
            for with_lengths in (False, True):
                clip = 0.05 if with_lengths else None
                cfg = dict(head=head, loss=loss, dtype=np.float64, num_layers=2,
                           bidirectional=head == "all")
                # every rank seeds differently: DataParallel must broadcast rank 0's
                dp = DataParallel(fastlstm.SequenceModel(2, 4, 3, seed=rank + 1, **cfg))
                one = fastlstm.SequenceModel(2, 4, 3, seed=1, **cfg)
                opt_dp, opt_one = fastlstm.Adam(dp.model, lr=1e-2), fastlstm.Adam(one, lr=1e-2)
                rng = np.random.default_rng(0)
                for step in range(10):
                    N = 7 + step % 3                      # uneven shards, some steps with 9
                    x, y, lengths = batch(rng, N, 5, loss, head, with_lengths)
                    mine = dp.part(np.arange(N))
                    got = dp.train_step(x[mine], y[mine], opt_dp,
                                        lengths=None if lengths is None else lengths[mine],
                                        clip_norm=clip)
                    want = one.train_step(x, y, opt_one, lengths=lengths, clip_norm=clip)
                    assert abs(got - want) <= TOL * max(1, abs(want)), (loss, head, got, want)
                err = rel_err(dp.model.flat_params, one.flat_params)
                assert err <= TOL, (loss, head, with_lengths, err)
                same_everywhere(dp.model.flat_params)
                worst = max(worst, err)
    return dict(worst_rel_err=worst)


def fit_matches_one_process():
    rng = np.random.default_rng(1)
    N, T = 23, 6
    x, y, lengths = batch(rng, N, T, "mse", "last", True)
    xv, yv, lv = batch(rng, 9, T, "mse", "last", True)
    kw = dict(epochs=3, batch_size=5, validation=(xv, yv, lv), lengths=lengths, seed=4,
              patience=2, progress=False, clip_norm=1.0)
    dp = DataParallel(fastlstm.SequenceModel(2, 4, 3, seed=rank, dtype=np.float64))
    one = fastlstm.SequenceModel(2, 4, 3, seed=0, dtype=np.float64)
    h_dp = dp.fit(x, y, fastlstm.Adam(dp.model, lr=1e-2), **kw)
    h_one = one.fit(x, y, fastlstm.Adam(one, lr=1e-2), **kw)
    assert h_dp["steps"] == h_one["steps"]
    for k in ("loss", "val_loss"):
        assert np.allclose(h_dp[k], h_one[k], rtol=TOL, atol=0), (k, h_dp[k], h_one[k])
    err = rel_err(dp.model.flat_params, one.flat_params)
    assert err <= TOL, err
    same_everywhere(dp.model.flat_params)
    # truncated BPTT too
    kw = dict(epochs=2, batch_size=6, seed=2, progress=False, bptt=2)
    x2, y2, _ = batch(rng, 18, T, "mse", "all", False)
    dp = DataParallel(fastlstm.SequenceModel(2, 4, 3, head="all", seed=0, dtype=np.float64))
    one = fastlstm.SequenceModel(2, 4, 3, head="all", seed=0, dtype=np.float64)
    dp.fit(x2, y2, fastlstm.Adam(dp.model, lr=1e-2), **kw)
    one.fit(x2, y2, fastlstm.Adam(one, lr=1e-2), **kw)
    assert rel_err(dp.model.flat_params, one.flat_params) <= TOL
    return dict(fit_rel_err=err)


def resume_is_bitwise(path):
    rng = np.random.default_rng(2)
    data = [batch(rng, 8, 5, "ce", "last", False) for _ in range(10)]

    def run(dp, opt, chunk):
        for x, y, _ in chunk:
            mine = dp.part(np.arange(len(x)))
            dp.train_step(x[mine], y[mine], opt)

    straight = DataParallel(fastlstm.SequenceModel(2, 4, 3, loss="ce", seed=3, dropout=0.3,
                                                   num_layers=2))
    opt = fastlstm.Adam(straight.model)
    run(straight, opt, data)
    first = DataParallel(fastlstm.SequenceModel(2, 4, 3, loss="ce", seed=3, dropout=0.3,
                                                num_layers=2))
    opt1 = fastlstm.Adam(first.model)
    run(first, opt1, data[:5])
    first.save(path, opt1)
    model, opt2 = fastlstm.load(path, with_optimizer=True)
    resumed = DataParallel(model)
    run(resumed, opt2, data[5:])
    assert np.array_equal(resumed.model.flat_params, straight.model.flat_params)
    same_everywhere(resumed.model.flat_params)
    return {}


def failing_rank():
    """Rank 1 passes bad targets: every rank raises, nobody waits forever."""
    dp = DataParallel(fastlstm.SequenceModel(2, 4, 1, seed=0))
    opt = fastlstm.Adam(dp.model)
    before = dp.model.flat_params.copy()
    x, y = np.ones((3, 5, 2), np.float32), np.ones((3, 1), np.float32)
    if rank == 1:
        y = y[:, :0]
    try:
        dp.train_step(x, y, opt)
    except (ValueError, RuntimeError) as e:
        print(f"rank {rank} raised {type(e).__name__}: {e}", flush=True)
    else:
        raise AssertionError("no rank may go on")
    assert np.array_equal(dp.model.flat_params, before)
    return {}


def refused_step_keeps_gradients():
    """Rank 1's shard is refused: no rank's accumulated gradients change."""
    dp = DataParallel(fastlstm.SequenceModel(2, 4, 1, seed=0, dtype=np.float64))
    opt = fastlstm.Adam(dp.model)
    x, y = np.ones((3, 5, 2)), np.ones((3, 1))
    dp.model.forward_backward(x, y)
    before = dp.model.flat_grads.copy()
    for call in ("train_step", "forward_backward"):
        bad = x[:, :, :1] if rank == 1 else x
        try:
            if call == "train_step":
                dp.train_step(bad, y, opt)
            else:
                dp.forward_backward(bad, y)
        except (ValueError, RuntimeError) as e:
            print(f"rank {rank} raised {type(e).__name__}: {e}", flush=True)
        else:
            raise AssertionError("no rank may go on")
        assert np.array_equal(dp.model.flat_grads, before), call
    assert opt.steps == 0
    return {}


def fit_with_different_data():
    """Rank 0 has 100 sequences, rank 1 80: both raise at once instead of hanging."""
    dp = DataParallel(fastlstm.SequenceModel(2, 4, 1, seed=0, dtype=np.float64))
    opt = fastlstm.Adam(dp.model)
    N = 100 if rank == 0 else 80
    x, y = np.ones((N, 5, 2)), np.ones((N, 1))
    try:
        dp.fit(x, y, opt, epochs=1, batch_size=10, progress=False)
    except ValueError as e:
        print(f"rank {rank} raised ValueError: {e}", flush=True)
    else:
        raise AssertionError("a rank went on with different data")
    assert opt.steps == 0
    return {}


def mismatched_models():
    try:
        DataParallel(fastlstm.SequenceModel(2, 4 + (rank == 1), 1, seed=0))
    except ValueError as e:
        print(f"rank {rank} raised ValueError: {e}", flush=True)
    else:
        raise AssertionError("a mismatched model was accepted")
    return {}


def uncaught():
    """An exception outside any DataParallel call on rank 1 only, while rank 0 waits in
    a collective: run with ``python -m mpi4py`` the job must abort, not hang."""
    if rank == 1:
        raise RuntimeError("rank 1 fails on its own")
    comm.Barrier()
    return {}


if __name__ == "__main__":
    case = sys.argv[1]
    args = sys.argv[2:]
    result = globals()[case](*args)
    if rank == 0:
        print(json.dumps(dict(case=case, ranks=size, **result)))
        print("ok", flush=True)
