"""Numba's on-disk cache: a kernel's entries are dropped when a file it inlines changes
(_config.follow), and an unwritable cache folder falls back with a warning."""
import os
import subprocess
import sys

import numpy as np
import pytest


def test_unwritable_cache_falls_back_with_a_warning():
    code = ("import warnings, numpy as np\nwarnings.simplefilter('always')\nimport fastlstm\n"
            "x = np.ones((2, 1, 2), np.float32)\n"
            "print(float(fastlstm.LSTM(2, 3, seed=0).forward(x)[0].sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, NUMBA_CACHE_DIR="/dev/null/not-a-folder"))
    assert out.returncode == 0, out.stderr
    assert "is not writable" in out.stderr
    assert np.isfinite(float(out.stdout.strip().splitlines()[-1]))

def test_cache_entries_follow_the_files_they_inline(tmp_path, monkeypatch):
    """A kernel's cache entry carries the code it inlined from other files, and Numba
    checks only the kernel's own file: _config.follow drops the entries of `path` when
    a dependency's contents change, and only then."""
    from fastlstm._config import _cache_folder, follow
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    path, dep = tmp_path / "kern.py", tmp_path / "dep.py"
    path.write_text("x = 1\n")
    dep.write_text("y = 1\n")
    folder = tmp_path / "__pycache__"
    folder.mkdir()
    assert _cache_folder(str(path)) == str(folder)

    def entries():
        for name in ("kern.f-3.py311.nbi", "kern.f-3.py311.1.nbc", "other.g-1.py311.nbi"):
            (folder / name).write_bytes(b"")

    def left():
        return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".deps"))

    entries()
    follow(str(path), str(dep))          # no stamp yet: entries of unknown age go
    assert left() == ["other.g-1.py311.nbi"]
    entries()
    follow(str(path), str(dep))          # unchanged: kept
    assert left() == ["kern.f-3.py311.1.nbc", "kern.f-3.py311.nbi", "other.g-1.py311.nbi"]
    dep.write_text("y = 2\n")
    follow(str(path), str(dep))          # the dependency changed: dropped
    assert left() == ["other.g-1.py311.nbi"]


def test_numba_is_within_the_tested_bound():
    """pyproject.toml bounds numba from above because _numba_ext reaches its internals;
    CI installs the newest numba within the bound, so this checks the bound CI tests."""
    import re

    import numba
    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    lo, hi = re.search(r'"numba>=([\d.]+),<([\d.]+)"', text).groups()

    def version(s):
        return tuple(int(p) for p in re.findall(r"\d+", s)[:2])

    assert version(lo) <= version(numba.__version__) < version(hi)
    from fastlstm import _numba_ext  # every internal it names still exists
    assert callable(_numba_ext.make_array) and _numba_ext.cache_locators()


_SMALL_RUN = """
import numpy as np
import pytest
import fastlstm
from fastlstm._kernels import layer_backward, layer_forward
m = fastlstm.LSTM(3, 8, dtype=np.float32, seed=0)
x = np.linspace(-1, 1, 5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
for _ in range(2):                       # the second call takes the plan
    y, _ = m.forward(x)
    dx, _ = m.backward(np.ones_like(y))
misses = sum(sum(d.stats.cache_misses.values()) for d in (layer_forward, layer_backward))
print(repr(float(y.sum())), repr(float(dx.sum())), repr(float(m.flat_grads.sum())), misses)
"""


def _run(env):
    return subprocess.Popen([sys.executable, "-c", _SMALL_RUN], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_two_processes_compiling_on_a_cold_cache_both_succeed(tmp_path):
    """Two processes compile at once into one empty cache (two MPI ranks on a fresh
    install): both finish, they compute the same numbers, say so once each, and a third
    process loads everything from the cache they left (compiles nothing)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("FASTLSTM_QUIET", None)
    procs = [_run(env) for _ in range(2)]
    outs = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for _, err, rc in outs:
        assert rc == 0, err
    results = [out.split()[:3] for out, _, _ in outs]
    assert results[0] == results[1]
    compiled = [(out, err) for out, err, _ in outs if out.split()[3] != "0"]
    assert compiled, "neither process compiled: the cache was not empty"
    for _, err in compiled:
        assert "compiling fastlstm's kernels for this machine (float32)" in err
        assert "first run only" in err
    third = _run(env)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    assert out.split()[:3] == results[0]
    assert out.split()[3] == "0", "the cache the two left was not used"
    assert "compiling" not in err


def test_import_compiles_nothing_and_a_dtype_compiles_when_first_used():
    """import fastlstm compiles no kernel; a float32 model compiles (or loads) the float32
    entries it calls and not the float64 ones."""
    code = ("import numpy as np\nimport fastlstm\nfrom fastlstm import _compile, _kernels\n"
            "assert not _kernels.layer_forward.signatures\n"
            "m = fastlstm.LSTM(2, 3, seed=0)\n"
            "y, _ = m.forward(np.ones((4, 2, 2), np.float32))\n"
            "assert _compile.ready(np.float32, _kernels.layer_forward)\n"
            "assert not _compile.ready(np.float32, _kernels.layer_backward)\n"
            "assert not _compile.ready(np.float64, _kernels.layer_forward)\n"
            "m.backward(np.ones_like(y))\n"
            "assert _compile.ready(np.float32, _kernels.layer_backward)\n"
            "print(len(_kernels.layer_forward.signatures))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]


def test_a_compile_says_what_it_does_and_a_load_says_nothing(capsys):
    """The progress line appears when an entry compiles for longer than DELAY and not
    when it loads from the cache within it."""
    from fastlstm import _compile
    p = _compile._Progress("float32", ["a", "b"])
    p._timer.cancel()
    p._show()                                     # as the timer does after DELAY
    p.step(True)
    p.step(False)
    p.close()
    err = capsys.readouterr().err
    assert "compiling fastlstm's kernels for this machine (float32)" in err
    assert "compiled 1 kernel (float32)" in err and "loaded 1 from the cache" in err
    q = _compile._Progress("float64", ["a"])
    q.step(False)
    q.close()
    assert capsys.readouterr().err == ""


def test_a_first_compile_of_the_column_kernels_prints_no_numba_warnings(tmp_path):
    """The bfloat16 column kernels, compiled into an empty cache, print no Numba warning
    (its pedantic SSA check warned two dozen times about the inlined row products)."""
    code = ("import numpy as np\nimport fastlstm\n"
            "m = fastlstm.LSTM(4, 32, seed=0)\n"
            "inf = fastlstm.Inference(m, weights='bfloat16')\n"
            "y, _ = inf.forward(np.ones((3, 1, 4), np.float32))\n"
            "print(y.shape)")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), FASTLSTM_QUIET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
