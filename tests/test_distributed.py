"""Data-parallel training over MPI, each case run as a job of 2 or 3 processes
(loopback only) and bounded by a timeout, so a hang is a failure, not a stall."""
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def mpi_available():
    if os.environ.get("FASTLSTM_REQUIRE_MPI", "0") not in ("", "0"):
        return True                     # CI: a missing MPI must fail, not skip
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec") is not None


pytestmark = pytest.mark.skipif(not mpi_available(), reason="needs mpi4py and mpiexec "
                                "(pip install -e '.[mpi]')")


def mpiexec(n, *args, timeout=300, module=False):
    exe = shutil.which("mpiexec") or "mpiexec"
    cmd = [exe, "-n", str(n), sys.executable] + (["-m", "mpi4py"] if module else []) + \
        [os.path.join(HERE, "mpi_cases.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", ["steps_match_one_process", "fit_matches_one_process"])
def test_data_parallel_equals_one_process(case, n):
    out = mpiexec(n, case)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_resume_from_a_checkpoint_on_two_ranks(tmp_path):
    out = mpiexec(2, "resume_is_bitwise", str(tmp_path / "ck.npz"))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_a_failing_rank_makes_every_rank_raise():
    out = mpiexec(2, "failing_rank", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 1 raised ValueError: y must have shape (3, 1), got (3, 0)" in out.stdout
    assert "rank 0 raised RuntimeError: train_step failed on 1 other rank(s)" in out.stdout


def test_a_refused_shard_changes_no_ranks_gradients():
    out = mpiexec(2, "refused_step_keeps_gradients", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 1 raised ValueError: x must have shape (B, T, 2), got (3, 5, 1)" in out.stdout
    assert "rank 0 raised RuntimeError: forward_backward failed on 1 other rank(s)" in out.stdout


def test_fit_with_different_data_on_the_ranks_raises_everywhere():
    out = mpiexec(2, "fit_with_different_data", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for r in (0, 1):
        assert (f"rank {r} raised ValueError: fit needs the same data on every rank: rank 1 "
                "has shape [80, 5, 2] against [100, 5, 2] on rank 0") in out.stdout


def test_mismatched_models_are_refused_on_every_rank():
    out = mpiexec(2, "mismatched_models", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for r in (0, 1):
        assert (f"rank {r} raised ValueError: the models on ranks [1] differ from rank 0's in "
                "hidden_size (5 against 4)") in out.stdout


def test_an_uncaught_exception_aborts_the_job_instead_of_hanging():
    out = mpiexec(2, "uncaught", timeout=120, module=True)
    assert out.returncode != 0 and "rank 1 fails on its own" in out.stderr


def test_fastlstm_train_distributed_reports_its_ranks(tmp_path):
    exe = shutil.which("mpiexec") or "mpiexec"
    out = subprocess.run([exe, "-n", "2", sys.executable, "-m", "fastlstm", "train",
                          "--distributed", "--task", "sine", "--steps", "20", "--json", "--save",
                          str(tmp_path / "m.npz")], capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out.stdout                    # rank 0 alone reports
    summary = json.loads(lines[0])
    assert summary["ranks"] == 2 and summary["steps"] == 20 and summary["settings"]["distributed"]
    import fastlstm
    assert fastlstm.load(tmp_path / "m.npz").lstm.hidden_size == 32
