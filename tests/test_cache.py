"""Numba's on-disk cache: a kernel's entries are dropped when a file it inlines changes
(_config.follow), and an unwritable cache folder falls back with a warning."""
import os
import subprocess
import sys

import numpy as np


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
