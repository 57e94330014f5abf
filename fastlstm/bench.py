"""`fastlstm bench`'s tables: fastlstm against the NumPy reference and torch.nn.LSTM.

The rooms: the cases timed (``_bench_cases``), the worker protocol that times each
implementation in a process of its own (``_bench_worker``), and here the tables built
from the workers' medians and their formatting. The asv suite has its own harness
(benchmarks/common.py).
"""
import time
from functools import partial

import numpy as np

from ._bench_cases import (
    DEEPBENCH_INFER,
    DEEPBENCH_TRAIN,
    IMPLS,
    SIZES,
    VARIANTS,
    Case,
    flops,
    torch_available,
)
from ._bench_worker import _alternated, _cases, _ratio_stats, _run_worker
from ._profile import ALL_ROWS, gemm_parts
from ._timing import median_time

__all__ = ["SIZES", "VARIANTS", "bench_table", "train_table", "variants_table", "profile",
           "recompute_table", "format_recompute_table", "stream_table", "format_stream_table",
           "torch_module_table", "format_torch_module_table",
           "distributed_table", "format_table", "format_train_table", "format_variants_table",
           "format_distributed_table"]


def bench_table(sizes, dtypes, min_time=0.2, progress=None, rounds=3, **layer):
    """fwd+bwd of fastlstm, the NumPy reference and torch at every (size, dtype), each
    implementation in its own process, alternated over `rounds`: medians of the
    per-round times and of the per-round ratios with their spread, and the matmul
    ceiling of each dtype. Layer options (num_layers, bidirectional, proj_size)
    leave the reference out: it is one layer, one direction."""
    layer = {k: v for k, v in layer.items() if v and not (k == "num_layers" and v == 1)}
    impls = [i for i in IMPLS if (i != "torch" or torch_available())
             and (i != "reference" or not layer)]
    cases = _cases(sizes, dtypes)
    ceilings = _run_worker(dict(kind="ceiling", dtypes=[np.dtype(d).name for d in dtypes]))
    times = _alternated("fwd_bwd", impls, cases, rounds, min_time, progress, layer)
    rows = []
    for key, (B, T, I, H, dtype) in cases.items():
        row = dict(size=key.split()[0], B=B, T=T, I=I, H=H, dtype=dtype, rounds=rounds, **layer)
        for impl in impls:
            row[f"{impl}_ms"] = float(np.median(times[impl][key]))
        fast = row["fastlstm_ms"]
        row["gflops"] = flops(B, T, I, H, **layer) / (fast * 1e-3) / 1e9
        row["ceiling_pct"] = 100 * row["gflops"] / ceilings[dtype]
        for impl, col in (("reference", "vs_reference"), ("torch", "vs_torch")):
            if impl in impls:
                row[col], row[col + "_min"], row[col + "_max"] = _ratio_stats(
                    times[impl][key], times["fastlstm"][key])
        rows.append(row)
    return dict(rows=rows, matmul_gflops=ceilings)


def format_table(result):
    nan = float("nan")
    lines = ["matmul ceiling (2048x2048 a @ a): " + ", ".join(
        f"{k} {v:.0f} GF/s" for k, v in result["matmul_gflops"].items()),
        "each library in its own process, alternated; x = the median of the per-round "
        "ratios [min-max]",
        f"{'size':8} {'dtype':8} {'fastlstm ms':>12} {'reference ms':>13} {'torch ms':>10} "
        f"{'x ref':>7} {'x torch [min-max]':>20} {'GF/s':>7} {'% ceil':>7}"]
    for r in result["rows"]:
        lines.append(
            f"{r['size']:8} {r['dtype']:8} {r['fastlstm_ms']:12.3f} "
            f"{r.get('reference_ms', nan):13.3f} {r.get('torch_ms', nan):10.3f} "
            f"{r.get('vs_reference', nan):7.2f} {_spread(r, 'vs_torch'):>20} "
            f"{r['gflops']:7.1f} {r['ceiling_pct']:7.1f}")
    return "\n".join(lines)


def _spread(r, col):
    if col not in r:
        return "-"
    return f"{r[col]:.2f} [{r[col + '_min']:.2f}-{r[col + '_max']:.2f}]"


def profile(B, T, I, H, dtype, min_time=0.2):
    """Split one fwd+bwd into its parts, for fastlstm and the reference.

    The GEMM parts are timed alone, each the way its implementation runs it
    (fastlstm: through Numba's BLAS, on each part of the batch at once as the layer
    splits it; the reference: NumPy's); "elementwise and the rest" is the whole
    fwd+bwd minus them (negative when the GEMMs alone ran slower than inside it).
    fastlstm's also has "recurrent GEMMs at the all-rows rate", not a part of the call:
    the recurrent GEMMs' multiply-adds timed as two GEMMs over all T*B rows (of each
    part), a bound on what faster per-step products could save.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T * B, I)).astype(dtype)
    h = rng.standard_normal((B, H)).astype(dtype)
    hs = rng.standard_normal((T * B, H)).astype(dtype)
    dz = rng.standard_normal((T * B, 4 * H)).astype(dtype)
    w_ih = rng.standard_normal((4 * H, I)).astype(dtype)
    w_hh = rng.standard_normal((4 * H, H)).astype(dtype)
    out = {}
    for impl in ("fastlstm", "reference"):
        case = Case(impl, B, T, I, H, dtype)
        split = len(case.model._last.split) if impl == "fastlstm" else 1
        parts = gemm_parts(impl, x, h, hs, dz, w_ih, w_hh, T, B, min_time, parts=split)
        all_rows = parts.pop(ALL_ROWS, None)
        gemms = sum(parts.values())
        total = median_time(case.fwd_bwd, min_time=min_time)
        parts["elementwise and the rest"] = total - gemms
        parts["total"] = total
        out[impl] = {k: v * 1e3 for k, v in parts.items()}
        out[impl]["parts of the batch"] = split
        out[impl]["GEMM share"] = gemms / total
        if all_rows is not None:
            out[impl][ALL_ROWS] = all_rows * 1e3
    return out


def train_table(sizes, dtypes, min_time=0.2, progress=None, rounds=3):
    """One training step of fastlstm, the reference backend and torch at every
    (size, dtype), each in its own process, alternated over `rounds`."""
    impls = [i for i in IMPLS if i != "torch" or torch_available()]
    cases = _cases(sizes, dtypes)
    times = _alternated("train", impls, cases, rounds, min_time, progress)
    rows = []
    for key, (B, T, I, H, dtype) in cases.items():
        row = dict(size=key.split()[0], B=B, T=T, I=I, H=H, dtype=dtype, rounds=rounds)
        for impl in impls:
            row[f"{impl}_ms"] = float(np.median(times[impl][key]))
        for impl, col in (("reference", "vs_reference"), ("torch", "vs_torch")):
            if impl in impls:
                row[col], row[col + "_min"], row[col + "_max"] = _ratio_stats(
                    times[impl][key], times["fastlstm"][key])
        rows.append(row)
    return dict(rows=rows)


def format_train_table(result):
    nan = float("nan")
    lines = ["one training step: LSTM + linear head on the last step + MSE + Adam",
             f"{'size':8} {'dtype':8} {'fastlstm ms':>12} {'reference ms':>13} {'torch ms':>10} "
             f"{'x ref':>7} {'x torch [min-max]':>20}"]
    for r in result["rows"]:
        lines.append(f"{r['size']:8} {r['dtype']:8} {r['fastlstm_ms']:12.3f} "
                     f"{r['reference_ms']:13.3f} {r.get('torch_ms', nan):10.3f} "
                     f"{r['vs_reference']:7.2f} {_spread(r, 'vs_torch'):>20}")
    return "\n".join(lines)


def deepbench_table(dtypes=("float32",), min_time=0.2, progress=None, rounds=3,
                    train=DEEPBENCH_TRAIN, infer=DEEPBENCH_INFER):
    """DeepBench's LSTM sizes (H, B, T; input H): training as fwd+bwd and inference as an
    evaluation-mode forward, fastlstm against torch, each in its own process, alternated
    over `rounds`; the median of the per-round ratios torch/fastlstm with their spread."""
    if not torch_available():
        raise RuntimeError("bench --deepbench compares with torch: pip install -e '.[torch]'")
    rows = []
    for kind, sizes in (("fwd_bwd", train), ("infer", infer)):
        cases = {f"{kind} H={H} B={B} T={T} {np.dtype(dt).name}": (B, T, H, H, np.dtype(dt).name)
                 for dt in dtypes for H, B, T in sizes}
        if not cases:
            continue
        # inference also with bfloat16 weights (float32 only) and torch's int8 dynamic
        # quantization, the peer a serving user would pick
        extra = ("fastlstm-bf16", "torch-int8") if kind == "infer" and all(
            np.dtype(d) == np.float32 for d in dtypes) else ()
        times = _alternated(kind, ("fastlstm", "torch") + extra, cases, rounds, min_time,
                            progress)
        for key, (B, T, _, H, dtype) in cases.items():
            row = _against_torch(times, key, kind="training" if kind == "fwd_bwd"
                                 else "inference", H=H, B=B, T=T, dtype=dtype, rounds=rounds)
            if extra:
                row["bf16_ms"] = float(np.median(times["fastlstm-bf16"][key]))
                row["int8_ms"] = float(np.median(times["torch-int8"][key]))
                row["bf16_vs_torch"], row["bf16_vs_torch_min"], row["bf16_vs_torch_max"] = \
                    _ratio_stats(times["torch"][key], times["fastlstm-bf16"][key])
                row["bf16_vs_int8"] = _ratio_stats(times["torch-int8"][key],
                                                   times["fastlstm-bf16"][key])[0]
            rows.append(row)
    return dict(rows=rows)


def _against_torch(times, key, **fields):
    """A row of `fields`, the two median times, and the per-round ratios torch/fastlstm."""
    row = dict(fields, fastlstm_ms=float(np.median(times["fastlstm"][key])),
               torch_ms=float(np.median(times["torch"][key])))
    row["vs_torch"], row["vs_torch_min"], row["vs_torch_max"] = _ratio_stats(
        times["torch"][key], times["fastlstm"][key])
    return row


def format_deepbench_table(result):
    lines = ["DeepBench LSTM sizes (input = H); training: fwd+bwd, inference: a forward in "
             "evaluation mode; x = torch time / fastlstm time, the median of the per-round "
             "ratios [min-max]",
             "inference also: fastlstm with bfloat16 weights (bf16) and torch's int8 dynamic "
             "quantization (int8); bf16 x = torch float32 / bf16, x int8 = int8 / bf16",
             f"{'kind':10} {'H':>5} {'B':>4} {'T':>4} {'dtype':8} {'fastlstm ms':>12} "
             f"{'torch ms':>10} {'x torch [min-max]':>20} {'bf16 ms':>9} {'int8 ms':>9} "
             f"{'bf16 x [min-max]':>20} {'x int8':>7}"]
    for r in result["rows"]:
        line = (f"{r['kind']:10} {r['H']:5d} {r['B']:4d} {r['T']:4d} {r['dtype']:8} "
                f"{r['fastlstm_ms']:12.3f} {r['torch_ms']:10.3f} "
                f"{_spread(r, 'vs_torch'):>20}")
        if "bf16_ms" in r:
            line += (f" {r['bf16_ms']:9.3f} {r['int8_ms']:9.3f} "
                     f"{_spread(r, 'bf16_vs_torch'):>20} {r['bf16_vs_int8']:7.2f}")
        lines.append(line)
    return "\n".join(lines)


def recompute_table(size, dtype="float32", min_time=0.3, progress=None, rounds=3,
                    settings=None):
    """fwd+bwd at one size (B, T, I, H) for recompute in (None, 10, "sqrt", T // 4), each
    setting in a process of its own, alternated over `rounds`: the median time, the
    median of the per-round ratios to None, the peak memory of the process and its growth
    over the data, the model and a warm-up call (medians over the rounds)."""
    B, T, I, H = size
    dtype = np.dtype(dtype).name
    settings = settings or ["None", "10", "sqrt", str(max(1, T // 4))]
    key = f"B={B} T={T} I={I} H={H} {dtype}"
    got = {k: [] for k in settings}
    for r in range(rounds):
        for k in settings:
            if progress:
                progress(f"round {r + 1}/{rounds}: recompute={k} (own process)")
            got[k].append(_run_worker(dict(kind="recompute", impl=k, min_time=min_time,
                                           cases={key: (B, T, I, H, dtype)})))
    rows = []
    for k in settings:
        runs = got[k]
        ms = [run[key] for run in runs]
        ratio = _ratio_stats(ms, [run[key] for run in got[settings[0]]])
        rows.append(dict(recompute=k, segment=runs[-1]["segment"], ms=float(np.median(ms)),
                         vs_none=ratio[0], vs_none_min=ratio[1], vs_none_max=ratio[2],
                         peak_mb=float(np.median([run["peak_mb"] for run in runs])),
                         growth_mb=float(np.median([run["growth_mb"] for run in runs]))))
    return dict(size=key, rounds=rounds, rows=rows)


def format_recompute_table(result):
    lines = [f"recompute at {result['size']}: fwd+bwd, each setting in its own process, "
             f"{result['rounds']} rounds; x = time / recompute=None's, the median of the "
             "per-round ratios [min-max]; memory: the process's peak, and its growth over the "
             "data, the model and a warm-up call",
             f"{'recompute':>10} {'steps/segment':>14} {'ms':>10} {'x None [min-max]':>20} "
             f"{'peak MiB':>9} {'growth MiB':>11}"]
    for r in result["rows"]:
        lines.append(f"{r['recompute']:>10} {str(r['segment'] or '-'):>14} {r['ms']:10.2f} "
                     f"{_spread(r, 'vs_none'):>20} {r['peak_mb']:9.0f} {r['growth_mb']:11.0f}")
    return "\n".join(lines)


STREAM_SIZES = ((1, 32, 64, 1), (1, 256, 256, 2))


def stream_table(sizes=STREAM_SIZES, steps=10_000, rounds=3, progress=None):
    """The per-step latency (p50, p99 over `steps` steps) of a live stream, float32, at
    each (B, I, H, layers): fastlstm's ``Inference.stream``, ``torch.nn.LSTM`` called one
    step at a time with its state, and onnxruntime running the exported model one step
    at a time, each in a process of its own, alternated over `rounds` (medians);
    fastlstm also with bfloat16 weights (fastlstm-bf16)."""
    impls = ["fastlstm", "fastlstm-bf16"]
    for name, module in (("torch", "torch"), ("onnxruntime", "onnxruntime")):
        try:
            __import__(module)
            impls.append(name)
        except ImportError:
            pass
    rows = []
    for size in sizes:
        got = {impl: [] for impl in impls}
        for r in range(rounds):
            for impl in impls:
                if progress:
                    progress(f"round {r + 1}/{rounds}: {impl} stream at {size} (own process)")
                got[impl].append(_run_worker(dict(kind="stream", impl=impl, size=list(size),
                                                  steps=steps)))
        row = dict(B=size[0], I=size[1], H=size[2], layers=size[3])
        for impl in impls:
            row[impl] = {k: float(np.median([g[k] for g in got[impl]]))
                         for k in ("p50_us", "p99_us")}
        rows.append(row)
    return dict(rows=rows, impls=impls, steps=steps, rounds=rounds)


def format_stream_table(result):
    lines = [f"a live stream, float32: per-step latency in us (p50 / p99 over "
             f"{result['steps']} steps, the median of {result['rounds']} rounds, each "
             "implementation in its own process); x = p50 / fastlstm's p50",
             f"{'B':>3} {'I':>5} {'H':>5} {'layers':>6}  "
             + "  ".join(f"{impl:>24}" for impl in result["impls"])]
    for r in result["rows"]:
        base = r["fastlstm"]["p50_us"]
        cells = [f"{r[i]['p50_us']:8.2f} / {r[i]['p99_us']:8.2f}"
                 + ("" if i == "fastlstm" else f" {r[i]['p50_us'] / base:5.1f}x")
                 for i in result["impls"]]
        lines.append(f"{r['B']:3d} {r['I']:5d} {r['H']:5d} {r['layers']:6d}  "
                     + "  ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def torch_module_table(sizes, dtypes, min_time=0.2, progress=None, rounds=3):
    """A torch training loop's step (``_bench_cases.TorchModuleCase``) with ``nn.LSTM``
    and with ``fastlstm.torch.LSTM``, each in its own process, alternated over `rounds`;
    a size named "packed..." runs as a PackedSequence of variable lengths. Also, at seed
    size, the wrapper's cost per fwd+bwd (``_bench_cases.TorchOverheadCase``)."""
    cases = _cases(sizes, dtypes)
    times = _alternated("torch_module", ["fastlstm", "torch"], cases, rounds, min_time,
                        progress)
    seed = _cases({"seed": SIZES["seed"]}, dtypes)
    impls = ["module", "fastlstm", "floor"]
    over = _alternated("torch_overhead", impls, seed, rounds, min_time, progress)
    overhead = []
    for key, (B, T, I, H, dtype) in seed.items():
        us = {i: np.array(over[i][key]) * 1e3 for i in impls}
        overhead.append(dict(dtype=dtype, B=B, T=T, I=I, H=H,
                             **{f"{i}_us": float(np.median(us[i])) for i in impls},
                             own_us=float(np.median(us["module"] - us["fastlstm"]
                                                    - us["floor"]))))
    return dict(rows=[_against_torch(times, key, size=key.split()[0], B=B, T=T, I=I, H=H,
                                     dtype=dtype, rounds=rounds)
                      for key, (B, T, I, H, dtype) in cases.items()], overhead=overhead)


def format_torch_module_table(result):
    lines = ["a torch training loop's step (LSTM, nn.Linear on the last step, MSELoss, Adam): "
             "nn.LSTM against fastlstm.torch.LSTM",
             f"{'size':8} {'dtype':8} {'fastlstm.torch ms':>18} {'nn.LSTM ms':>11} "
             f"{'x nn.LSTM [min-max]':>22}"]
    for r in result["rows"]:
        lines.append(f"{r['size']:8} {r['dtype']:8} {r['fastlstm_ms']:18.3f} "
                     f"{r['torch_ms']:11.3f} {_spread(r, 'vs_torch'):>22}")
    lines.append("one fwd+bwd at seed size, us (medians; each in its own process): "
                 "fastlstm.torch.LSTM, the fastlstm.LSTM it runs on alone, a do-nothing "
                 "autograd.Function of its signature, and the wrapper's own cost (the first "
                 "less the other two, per round)")
    for r in result.get("overhead", []):
        lines.append(f"{r['dtype']:8} module {r['module_us']:7.1f}  fastlstm "
                     f"{r['fastlstm_us']:6.1f}  autograd.Function {r['floor_us']:6.1f}  "
                     f"wrapper's own {r['own_us']:6.1f}")
    return "\n".join(lines)


def variants_table(sizes, dtypes, min_time=0.2, progress=None, rounds=3):
    """fwd+bwd (training mode) of every variant in ``VARIANTS`` at every (size, dtype):
    fastlstm, and the same layer as a torch-autograd step loop (``TorchLoop``), each
    in its own process, alternated over `rounds`. Per row: the cost over the plain
    layer (per-round ratio to fastlstm's plain row) and torch_loop / fastlstm."""
    impls = ["fastlstm"] + (["torch_loop"] if torch_available() else [])
    cases = {f"{v} {name} {np.dtype(dt).name}": (*shape, np.dtype(dt).name)
             for dt in dtypes for name, shape in sizes.items() for v in VARIANTS}
    times = _alternated("variants", impls, cases, rounds, min_time, progress)
    rows = []
    for key, (B, T, I, H, dtype) in cases.items():
        variant, size, _ = key.split()
        fast = times["fastlstm"][key]
        row = dict(variant=variant, size=size, B=B, T=T, I=I, H=H, dtype=dtype, rounds=rounds,
                   fastlstm_ms=float(np.median(fast)))
        row["vs_plain"], row["vs_plain_min"], row["vs_plain_max"] = _ratio_stats(
            fast, times["fastlstm"][f"plain {size} {dtype}"])
        if "torch_loop" in impls:
            row["torch_loop_ms"] = float(np.median(times["torch_loop"][key]))
            row["vs_torch_loop"], row["vs_torch_loop_min"], row["vs_torch_loop_max"] = \
                _ratio_stats(times["torch_loop"][key], fast)
        rows.append(row)
    return dict(rows=rows)


def format_variants_table(result):
    nan = float("nan")
    lines = ["fwd+bwd of each variant in training mode, fastlstm against the same layer "
             "written as a torch-autograd step loop",
             "each in its own process, alternated; x = the median of the per-round ratios "
             "[min-max]",
             f"{'variant':18} {'size':7} {'dtype':8} {'fastlstm ms':>12} "
             f"{'x plain [min-max]':>20} {'torch loop ms':>14} {'x torch loop [min-max]':>23}"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:18} {r['size']:7} {r['dtype']:8} {r['fastlstm_ms']:12.3f} "
                     f"{_spread(r, 'vs_plain'):>20} {r.get('torch_loop_ms', nan):14.3f} "
                     f"{_spread(r, 'vs_torch_loop'):>23}")
    return "\n".join(lines)


def _dp_step_times(comm, dp, x, y, opt, n):
    """Seconds per data-parallel step and, of that, in collectives, over n steps."""
    comm.Barrier()
    dp.allreduce_seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        dp.step_global(x, y, opt)
    step = (time.perf_counter() - t0) / n
    return step, dp.allreduce_seconds / n


def distributed_table(sizes, dtypes, min_time=1.0, progress=None):
    """Data-parallel training steps over the ranks of this MPI job (LSTM, linear head
    on the last step, MSE, Adam; the global batch B split over the ranks), each rank
    with one BLAS thread: steps per second, one Allreduce of the flat gradient alone,
    and the share of a step spent in collectives (which includes waiting for the
    slowest rank). Every rank must call it; rank 0 gets the figures (None elsewhere)."""
    from threadpoolctl import threadpool_limits

    from .distributed import MPI, DataParallel
    from .model import SequenceModel
    from .optim import Adam
    comm = MPI.COMM_WORLD
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        for dtype in dtypes:
            for name, (B, T, I, H) in sizes.items():
                if progress and comm.Get_rank() == 0:
                    progress(f"distributed train step {name} {dtype} on {comm.Get_size()} ranks")
                rng = np.random.default_rng(0)
                x = rng.standard_normal((B, T, I)).astype(dtype)
                y = rng.standard_normal((B, 1)).astype(dtype)
                dp = DataParallel(SequenceModel(I, H, 1, dtype=np.dtype(dtype), seed=0))
                opt = Adam(dp.model, lr=1e-3)
                _dp_step_times(comm, dp, x, y, opt, 2)                 # warm-up
                guess = _dp_step_times(comm, dp, x, y, opt, 3)[0]
                n = max(3, int(comm.bcast(min_time / max(guess, 1e-6), root=0)))
                step_s, coll_s = _dp_step_times(comm, dp, x, y, opt, n)
                grads = dp.model.flat_grads.copy()
                comm.Barrier()
                alone = median_time(partial(comm.Allreduce, MPI.IN_PLACE, grads, op=MPI.SUM),
                                    min_time=min_time / 4)
                rows.append(dict(size=name, B=B, T=T, I=I, H=H, dtype=np.dtype(dtype).name,
                                 ranks=comm.Get_size(), params=int(grads.size),
                                 step_ms=step_s * 1e3, steps_per_s=1 / step_s,
                                 allreduce_ms=alone * 1e3, collective_share=coll_s / step_s))
    return dict(rows=rows) if comm.Get_rank() == 0 else None


def format_distributed_table(result):
    lines = ["data-parallel training step (LSTM + linear head + MSE + Adam), global batch B "
             "split over the ranks",
             f"{'size':8} {'dtype':8} {'ranks':>5} {'params':>9} {'step ms':>9} {'steps/s':>8} "
             f"{'allreduce ms':>13} {'in collectives':>15}"]
    for r in result["rows"]:
        lines.append(f"{r['size']:8} {r['dtype']:8} {r['ranks']:5d} {r['params']:9d} "
                     f"{r['step_ms']:9.3f} {r['steps_per_s']:8.1f} {r['allreduce_ms']:13.4f} "
                     f"{100 * r['collective_share']:14.1f}%")
    return "\n".join(lines)
