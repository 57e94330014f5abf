"""Pictures (fastlstm.plot) and the ahead-of-time compile (fastlstm compile)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import fastlstm

matplotlib = pytest.importorskip("matplotlib")


def _image(path):
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_fit_draws_its_history(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6, 2)).astype(np.float32)
    y = x[:, -2:, :1].sum(axis=1)
    m = fastlstm.SequenceModel(2, 8, 1, seed=0)
    path = tmp_path / "fit.png"
    h = m.fit(x[:48], y[:48], fastlstm.Adam(m), epochs=3, validation=(x[48:], y[48:]),
              progress=False, plot=str(path))
    assert len(h["loss"]) == len(h["val_loss"]) == 3
    img = _image(path)
    assert img.shape[1] == 720                    # one panel: no accuracy in this history
    # not a blank canvas: the curves put colour on it
    assert np.unique(img.reshape(-1, img.shape[2]), axis=0).shape[0] > 50


def test_plot_history_draws_accuracy_and_criterion_in_a_second_panel(tmp_path):
    h = dict(loss=[0.5, 0.2, 0.1], val_loss=[0.6, 0.3, 0.2], val_accuracy=[0.5, 0.9, 1.0],
             at=[100, 200, 300], T=[10, 16, 25])
    path = fastlstm.plot_history(h, str(tmp_path / "h.png"), criterion=(0.99, "goal"))
    assert _image(path).shape[1] == 1200
    with pytest.raises(ValueError, match="no 'loss'"):
        fastlstm.plot_history({}, str(tmp_path / "empty.png"))


def test_plot_bench_draws_ratios_with_their_spread(tmp_path):
    rows = [dict(size=s, dtype=d, vs_torch=r, vs_torch_min=r * 0.9, vs_torch_max=r * 1.1)
            for s, d, r in [("seed", "float32", 1.5), ("seed", "float64", 3.0),
                            ("small", "float32", 1.2)]]
    path = fastlstm.plot_bench(dict(rows=rows), str(tmp_path / "b.png"))
    assert _image(path).ndim == 3
    with pytest.raises(ValueError, match="no ratios against torch"):
        fastlstm.plot_bench(dict(rows=[dict(size="seed", dtype="float32")]),
                            str(tmp_path / "none.png"))


def test_train_plot_writes_the_adding_curve(tmp_path):
    path = tmp_path / "curve.png"
    out = subprocess.run([sys.executable, "-m", "fastlstm", "train", "--seq-len", "10",
                          "--steps", "400", "--plot", str(path), "--json"],
                         capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["plot"] == str(path)
    assert _image(path).shape[1] == 1200


@pytest.mark.parametrize("args,message", [
    (["train", "--task", "sine", "--plot", "x.png"], "--plot does not apply to --task sine"),
    (["bench", "--train", "--plot", "x.png"], "does not combine with --train"),
    (["train", "--plot", "/no/such/folder/x.png"], "does not exist"),
])
def test_plot_options_refused_where_they_do_not_apply(args, message):
    out = subprocess.run([sys.executable, "-m", "fastlstm", *args], capture_output=True,
                         text=True)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    code = ("import sys\nsys.modules['matplotlib'] = None\nimport fastlstm\n"
            "from fastlstm.cli import main\n"
            "try:\n    fastlstm.plot_history({'loss': [1.0]}, 'x.png')\n"
            "except ImportError as e:\n    print('library:', e)\n"
            f"main(['train', '--seq-len', '10', '--plot', {str(tmp_path / 'c.png')!r}])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "library: plotting needs matplotlib: pip install 'fastlstm[plot]'" in out.stdout
    assert out.returncode == 2
    assert "--plot needs matplotlib: pip install 'fastlstm[plot]'" in out.stderr


def test_compile_command_leaves_nothing_to_compile(tmp_path):
    """After `fastlstm compile --dtype float64`, a new process's layer calls (plain, split
    across threads, the fused step) compile no entry."""
    out = subprocess.run([sys.executable, "-m", "fastlstm", "compile", "--dtype", "float64"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("float64: compiled or loaded in")
    code = """
import numpy as np
import fastlstm
from fastlstm import _compile
m = fastlstm.SequenceModel(4, 64, 1, dtype=np.float64, seed=0)
opt = fastlstm.Adam(m)
x, y = np.ones((64, 50, 4)), np.ones((64, 1))
for _ in range(3):
    m.train_step(x, y, opt)
lstm = fastlstm.LSTM(4, 64, dtype=np.float64, seed=0)
for _ in range(2):
    out, _ = lstm.forward(x.transpose(1, 0, 2).copy())
    lstm.backward(np.ones_like(out))
print(sum(sum(d.stats.cache_misses.values()) for d in _compile.entries()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"]
    assert "compiling" not in out.stderr
