"""The worker protocol of `fastlstm bench`: each implementation timed in a process of
its own, the processes alternated A B A B over rounds, ratios taken round by round.

Inside one process OpenBLAS's and torch's OpenMP threads keep spinning after a call
and steal the cores from the other library (one torch call read 82 ms in one run and
181 ms in another). A worker is `python -m fastlstm._bench_worker SPEC` (SPEC: JSON);
it prints {case key: median ms} as its last line.
"""
import json
import subprocess
import sys

import numpy as np

from ._bench_cases import (
    VARIANTS,
    Case,
    TorchLoop,
    TorchModuleCase,
    TorchOverheadCase,
    TrainCase,
    matmul_gflops,
)
from ._timing import median_time


def _worker(spec):
    """Time the cases of `spec` in this process; returns {case key: median ms}."""
    out = {}
    if spec["kind"] == "ceiling":
        return {dt: matmul_gflops(dt) for dt in spec["dtypes"]}
    if spec["kind"] == "recompute":
        return _recompute_worker(spec)
    if spec["kind"] == "stream":
        return _stream_worker(spec)
    for key, (B, T, I, H, dtype) in spec["cases"].items():
        if spec["kind"] == "train":
            fn = TrainCase(spec["impl"], B, T, I, H, dtype).step
        elif spec["kind"] == "torch_module":
            fn = TorchModuleCase(spec["impl"], B, T, I, H, dtype,
                                 packed=key.startswith("packed")).step
        elif spec["kind"] == "torch_overhead":
            fn = TorchOverheadCase(spec["impl"], B, T, I, H, dtype).step
        elif spec["kind"] == "variants":
            opts = VARIANTS[key.split()[0]]
            fn = (TorchLoop(B, T, I, H, dtype, **opts) if spec["impl"] == "torch_loop"
                  else Case("fastlstm", B, T, I, H, dtype, **opts)).fwd_bwd
        elif spec["kind"] == "infer":
            fn = Case(spec["impl"], B, T, I, H, dtype, **spec["layer"]).infer
        else:
            fn = Case(spec["impl"], B, T, I, H, dtype, **spec["layer"]).fwd_bwd
        out[key] = median_time(fn, min_time=spec["min_time"]) * 1e3
    return out

def _rss_mb(peak=False):
    """This process's resident memory now (Linux), or its peak, in MiB."""
    import resource
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def _recompute_worker(spec):
    """One recompute setting (spec["impl"]: "None", "sqrt" or a number of steps) at one
    size: the fwd+bwd time, the process's peak memory and its growth over what the data,
    the model and a small warm-up call hold, and the segment steps the layer used."""
    (key, (B, T, I, H, dtype)), = spec["cases"].items()
    k = spec["impl"]
    recompute = None if k == "None" else k if k == "sqrt" else int(k)
    case = Case("fastlstm", B, T, I, H, dtype, recompute=recompute)
    case.model.forward(case.x[:2])             # the layer's kernels compiled: not counted
    case.model.backward(case.dy[:2])
    base = _rss_mb()
    ms = median_time(case.fwd_bwd, min_time=spec["min_time"]) * 1e3
    peak = _rss_mb(peak=True)
    return {key: ms, "peak_mb": peak, "growth_mb": peak - base,
            "segment": case.model.last_segment_steps}


def _stream_worker(spec):
    """Per-step latency of one implementation run one step at a time with its state:
    {"p50_us", "p99_us"} over spec["steps"] steps (after 1000 not timed)."""
    import time
    B, I, H, L = spec["size"]
    impl = spec["impl"]
    x = np.random.default_rng(0).standard_normal((B, I)).astype(np.float32)
    if impl in ("fastlstm", "fastlstm-bf16"):
        from .inference import Inference
        from .lstm import LSTM
        s = Inference(LSTM(I, H, num_layers=L, seed=0),
                      weights="bfloat16" if impl == "fastlstm-bf16" else "float32").stream(B)

        def step():
            s.step(x)
    elif impl == "torch":
        import torch
        torch.set_grad_enabled(False)
        lstm = torch.nn.LSTM(I, H, num_layers=L).eval()
        xt = torch.from_numpy(x)[None]
        state = [(torch.zeros(L, B, H), torch.zeros(L, B, H))]

        def step():
            _, state[0] = lstm(xt, state[0])
    else:                                           # onnxruntime, the exported model
        import os
        import tempfile

        import onnxruntime as ort

        from .interop import export_onnx
        from .lstm import LSTM
        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(LSTM(I, H, num_layers=L, seed=0), os.path.join(d, "m.onnx"))
            opts = ort.SessionOptions()
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"x": x[None], "lengths": np.ones(B, np.int64),
                "h0": np.zeros((L, B, H), np.float32), "c0": np.zeros((L, B, H), np.float32)}

        def step():
            _, feed["h0"], feed["c0"] = sess.run(None, feed)
    for _ in range(1000):
        step()
    ts = np.empty(spec["steps"])
    clock = time.perf_counter
    for i in range(len(ts)):
        t = clock()
        step()
        ts[i] = clock() - t
    return {"p50_us": float(np.percentile(ts, 50) * 1e6),
            "p99_us": float(np.percentile(ts, 99) * 1e6)}


def _run_worker(spec):
    done = subprocess.run([sys.executable, "-m", "fastlstm._bench_worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {spec.get('impl', spec['kind'])} worker failed:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

def _alternated(kind, impls, cases, rounds, min_time, progress, layer=None):
    """{impl: {case: [ms per round]}}, the implementations' workers taking turns."""
    times = {impl: {key: [] for key in cases} for impl in impls}
    for r in range(rounds):
        for impl in impls:
            if progress:
                progress(f"round {r + 1}/{rounds}: {impl} ({len(cases)} cases, own process)")
            got = _run_worker(dict(kind=kind, impl=impl, cases=cases, min_time=min_time,
                                   layer=layer or {}))
            for key, ms in got.items():
                times[impl][key].append(ms)
    return times

def _ratio_stats(num, den):
    """Median, min and max of the per-round ratios num[r] / den[r]."""
    ratios = np.array(num) / np.array(den)
    return float(np.median(ratios)), float(ratios.min()), float(ratios.max())

def _cases(sizes, dtypes):
    return {f"{name} {np.dtype(dt).name}": (*shape, np.dtype(dt).name)
            for dt in dtypes for name, shape in sizes.items()}


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
