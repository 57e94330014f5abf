"""Every Python block of the README and of docs/ runs: a page's blocks in order, in one
fresh process, in an empty folder (so that the examples cannot rot)."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                               for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def blocks(page):
    text = open(os.path.join(ROOT, page)).read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_pages_are_found_and_hold_examples():
    assert "docs/layer.md" in PAGES and "docs/training.md" in PAGES
    assert blocks("README.md") and blocks("docs/layer.md")


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)])
def test_python_blocks_run(page, tmp_path):
    code = "\n\n".join(f"# --- block {k} of {page}\n{b}" for k, b in enumerate(blocks(page)))
    env = dict(os.environ, FASTLSTM_QUIET="1", PYTHONPATH=os.path.abspath(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, f"{page}:\n{out.stderr[-3000:]}"
