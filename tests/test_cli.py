"""`fastlstm train`: every option either shapes the run or is refused by name."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastlstm


def train(*args):
    out = subprocess.run([sys.executable, "-m", "fastlstm", "train", *args], capture_output=True,
                         text=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1]) if "--json" in args and \
        out.returncode in (0, 1) else None
    return out, summary


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_article_honours_dtype_and_hidden(dtype):
    out, s = train("--task", "article", "--dtype", dtype, "--hidden", "4", "--steps", "20",
                   "--json")
    assert out.returncode in (0, 1), out.stderr
    assert s["dtype"] == dtype and s["settings"]["hidden"] == 4 and s["steps"] == 20
    # the losses were computed in that dtype: float32 values round-trip through float32
    assert (float(np.float32(s["loss_first"])) == s["loss_first"]) == (dtype == "float32")


@pytest.mark.parametrize("task,extra", [("sine", []), ("adding", ["--seq-len", "10"])])
def test_saved_model_has_the_options_given(tmp_path, task, extra):
    path = tmp_path / "m.npz"
    out, s = train("--task", task, "--steps", "3", "--dtype", "float64", "--hidden", "6",
                   "--layers", "2", "--optimizer", "sgd", "--backend", "fastlstm", "--save",
                   str(path), "--json", *extra)
    assert out.returncode in (0, 1), out.stderr
    m = fastlstm.load(path)
    assert m.dtype == np.float64 and m.lstm.hidden_size == 6 and m.lstm.num_layers == 2
    assert s["settings"]["optimizer"] == "sgd" and s["dtype"] == "float64" and s["steps"] == 3


@pytest.mark.parametrize("backend", ["fastlstm", "reference"])
def test_variant_options_reach_the_saved_model(tmp_path, backend):
    path = tmp_path / "v.npz"
    out, s = train("--task", "adding", "--seq-len", "10", "--steps", "3", "--peephole",
                   "--layer-norm", "--zoneout", "0.1", "--zoneout-cell", "0.05",
                   "--recurrent-dropout", "0.2", "--backend", backend, "--save", str(path),
                   "--json")
    assert out.returncode in (0, 1), out.stderr
    m = fastlstm.load(path)
    assert (m.lstm.peephole, m.lstm.layer_norm, m.lstm.zoneout, m.lstm.zoneout_cell,
            m.lstm.recurrent_dropout) == (True, True, 0.1, 0.05, 0.2)
    assert "weight_ci_l0" in m.lstm.params and "ln_c_bias_l0" in m.lstm.params
    assert s["settings"]["zoneout"] == 0.1 and s["settings"]["peephole"] is True


@pytest.mark.parametrize("args,message", [
    (["--task", "article", "--save", "m.npz"], "--save does not apply to --task article"),
    (["--task", "article", "--optimizer", "adam"], "--optimizer does not apply to --task article"),
    (["--task", "article", "--layers", "2"], "--layers does not apply to --task article"),
    (["--task", "adding", "--epochs", "3"], "--epochs does not apply to --task adding"),
    (["--task", "sine", "--no-curriculum"], "--no-curriculum does not apply to --task sine"),
    (["--data", "d.npz", "--steps", "4"], "--steps does not apply to --data"),
    (["--data", "d.npz", "--task", "sine"], "give --task or --data, not both"),
    (["--task", "article", "--distributed"], "--distributed does not apply to --task article"),
    (["--hidden", "0"], "argument --hidden: must be > 0"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--task", "article", "--peephole"], "--peephole does not apply to --task article"),
    (["--zoneout", "1.5"], "argument --zoneout: must be in [0, 1), got '1.5'"),
    (["--recurrent-dropout", "x"], "argument --recurrent-dropout: expected a float"),
])
def test_options_a_run_does_not_take_are_refused(args, message):
    out, _ = train(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_bench_profile_times_every_gemm_and_reports_the_rest_of_the_call():
    """Each GEMM kind is timed alone (so it must take some time); "the rest" and the GEMM
    share are derived from the whole fwd+bwd. How the parts compare with the whole is a
    timing (the GEMMs alone can run slower than inside the call on a busy machine, as
    the docstring of bench.profile says), so it is not asserted here."""
    # 64 sequences of 40 steps: enough work for the layer to split the batch
    out = subprocess.run([sys.executable, "-m", "fastlstm", "bench", "--profile", "--size",
                          "64,40,16,32", "--dtype", "float32", "--min-time", "0.05", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])["64,40,16,32 float32"]
    for impl in ("fastlstm", "reference"):
        p = res[impl]
        gemms = {k: v for k, v in p.items() if "GEMM" in k and k not in (
            "GEMM share", "recurrent GEMMs at the all-rows rate")}
        assert set(gemms) == {"input GEMM", "recurrent GEMMs",
                              "dx and weight-gradient GEMMs"}, p
        assert all(v > 0 for v in gemms.values()) and p["total"] > 0, p
        assert p["elementwise and the rest"] == pytest.approx(p["total"] - sum(gemms.values()))
        assert p["GEMM share"] == pytest.approx(sum(gemms.values()) / p["total"])
    assert res["reference"]["parts of the batch"] == 1
    assert res["fastlstm"]["parts of the batch"] >= 1
    assert res["fastlstm"]["recurrent GEMMs at the all-rows rate"] > 0
    assert "recurrent GEMMs at the all-rows rate" not in res["reference"]


@pytest.mark.torch
def test_bench_torch_module_times_both_modules():
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-m", "fastlstm", "bench", "--torch-module", "--size",
                          "seed", "--size", "4,20,3,8", "--dtype", "float32", "--rounds", "2",
                          "--min-time", "0.05", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert [r["size"] for r in rows] == ["seed", "4,20,3,8"]
    for r in rows:
        assert r["fastlstm_ms"] > 0 and r["torch_ms"] > 0 and r["rounds"] == 2
        assert r["vs_torch_min"] <= r["vs_torch"] <= r["vs_torch_max"]
    over, = json.loads(out.stdout.strip().splitlines()[-1])["overhead"]
    assert (over["dtype"], over["B"], over["H"]) == ("float32", 1, 3)
    assert over["module_us"] > 0 and over["fastlstm_us"] > 0 and over["floor_us"] > 0


def test_bench_deepbench_times_training_and_inference_against_torch():
    """bench --deepbench's table on two tiny stand-in sizes (the real ones take minutes):
    a fwd+bwd and an evaluation forward, each library in its own process."""
    pytest.importorskip("torch")
    from fastlstm import bench
    r = bench.deepbench_table(min_time=0.01, rounds=1, train=[(16, 2, 3)], infer=[(16, 1, 3)])
    assert [row["kind"] for row in r["rows"]] == ["training", "inference"]
    for row in r["rows"]:
        assert row["fastlstm_ms"] > 0 and row["torch_ms"] > 0
        assert row["vs_torch_min"] <= row["vs_torch"] <= row["vs_torch_max"]
    infer = r["rows"][1]              # beside it: bfloat16 weights and torch's int8 LSTM
    assert infer["bf16_ms"] > 0 and infer["int8_ms"] > 0 and infer["bf16_vs_torch"] > 0
    text = bench.format_deepbench_table(r)
    assert "inference" in text and "   16    1    3" in text and "int8" in text
    from fastlstm._bench_cases import DEEPBENCH_INFER, DEEPBENCH_TRAIN
    assert len(DEEPBENCH_TRAIN) == 18 and len(DEEPBENCH_INFER) == 15
    assert max(H for H, _, _ in DEEPBENCH_TRAIN + DEEPBENCH_INFER) == 2048
    out = subprocess.run([sys.executable, "-m", "fastlstm", "bench", "--deepbench", "--size",
                          "seed"], capture_output=True, text=True)
    assert out.returncode == 2 and "does not take --size" in out.stderr


def test_bench_recompute_prints_time_and_memory_per_setting():
    """bench --recompute at a small size, one round: every setting in its own process,
    its segment steps, a ratio to None's time (1 for None) and the process's memory."""
    out = subprocess.run([sys.executable, "-m", "fastlstm", "bench", "--recompute", "--size",
                          "2,400,3,8", "--rounds", "1", "--min-time", "0.01", "--json"],
                         capture_output=True, text=True, env=dict(os.environ, FASTLSTM_QUIET="1"))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert [row["recompute"] for row in r["rows"]] == ["None", "10", "sqrt", "100"]
    none, ten, sqrt, quarter = r["rows"]
    assert none["segment"] is None and none["vs_none"] == 1.0
    assert ten["segment"] >= 10 and sqrt["segment"] >= 20 and quarter["segment"] >= 100
    assert all(row["ms"] > 0 and row["peak_mb"] > row["growth_mb"] >= 0 for row in r["rows"])
    two = subprocess.run([sys.executable, "-m", "fastlstm", "bench", "--recompute", "--size",
                          "seed", "--size", "small"], capture_output=True, text=True)
    assert two.returncode == 2 and "one --size" in two.stderr


def test_bench_stream_times_each_implementation_one_step_at_a_time():
    """bench --stream's table at a tiny size: fastlstm, and torch and onnxruntime when
    installed, each in its own process, with p50 <= p99."""
    from fastlstm import bench
    r = bench.stream_table(sizes=[(1, 4, 8, 1)], steps=200, rounds=1)
    assert r["impls"][:2] == ["fastlstm", "fastlstm-bf16"]
    row = r["rows"][0]
    for impl in r["impls"]:
        assert 0 < row[impl]["p50_us"] <= row[impl]["p99_us"]
    assert "fastlstm" in bench.format_stream_table(r)
    out = subprocess.run([sys.executable, "-m", "fastlstm", "bench", "--stream", "--size",
                          "seed"], capture_output=True, text=True)
    assert out.returncode == 2 and "does not take --size" in out.stderr
