"""Timing fastlstm against the NumPy reference and torch.nn.LSTM.

Used by ``fastlstm bench`` (the asv suite has its own harness, benchmarks/common.py).
Every ratio is taken from medians measured side by side in one process.
"""

import time
from functools import partial

import numpy as np

from . import _options
from ._profile import ALL_ROWS, gemm_parts
from ._timing import median_time
from .lstm import LSTM
from .reference import ReferenceLSTM

#: name: (B, T, I, H)
SIZES = {
    "seed": (1, 3, 2, 3),
    "small": (32, 50, 32, 64),
    "long": (8, 1000, 16, 64),
    "medium": (64, 100, 128, 256),
    "large": (128, 100, 512, 512),
}


def flops(B, T, I, H, num_layers=1, bidirectional=False, proj_size=0):
    """FLOPs of one forward+backward, counting the matrix products only."""
    D, P = (2 if bidirectional else 1), (proj_size or H)
    total = 0
    for k in range(num_layers):
        I_k = I if k == 0 else D * P
        total += D * 2 * T * B * ((I_k + P) * 4 * H + (H * P if proj_size else 0)) * 3
    return total


#: the variants `fastlstm bench --variants` times, as options of fastlstm.LSTM
VARIANTS = _options.bench_variants()


def matmul_gflops(dtype, n=2048, min_time=0.5):
    """The ceiling: GFLOP/s of an n x n ``a @ a`` in this process."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    return 2 * n ** 3 / median_time(lambda: a @ a, min_time=min_time, min_repeats=3) / 1e9


class Case:
    """One (implementation, size, dtype) with ``forward``, ``backward`` and ``fwd_bwd``."""

    def __init__(self, impl, B, T, I, H, dtype, seed=0, **layer):
        dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        D = 2 if layer.get("bidirectional") else 1
        self.x = rng.standard_normal((T, B, I)).astype(dtype)
        self.dy = rng.standard_normal((T, B, D * (layer.get("proj_size") or H))).astype(dtype)
        self.impl = impl
        if impl == "torch":
            import torch
            tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype.type]
            self.model = torch.nn.LSTM(I, H, **layer).to(tdt)
            self.x = torch.from_numpy(self.x).requires_grad_(True)
            self.dy = torch.from_numpy(self.dy)
        elif impl == "fastlstm":
            self.model = LSTM(I, H, dtype=dtype, seed=seed, **layer)
        else:
            if any(layer.values()):
                raise ValueError("the NumPy reference is one layer, one direction")
            self.model = ReferenceLSTM(I, H, dtype=dtype, seed=seed)
        self.forward()

    def forward(self):
        self.y = self.model.forward(self.x)[0] if self.impl != "torch" else self.model(self.x)[0]

    def backward(self):
        if self.impl == "torch":
            self.y.backward(self.dy, retain_graph=True)
        else:
            self.model.backward(self.dy)

    def fwd_bwd(self):
        self.forward()
        if self.impl == "torch":
            self.y.backward(self.dy)
        else:
            self.model.backward(self.dy)


IMPLS = ("fastlstm", "reference", "torch")


class TorchLoop:
    """The same layer written with torch autograd ops, a step loop as a torch user
    writes a variant that torch.nn.LSTM lacks (torch.nn.LSTMCell's maths, the input
    projection of all steps in one product, functional layer_norm, masks drawn by
    torch.bernoulli each call); training mode, one layer, one direction."""

    def __init__(self, B, T, I, H, dtype, seed=0, **opts):
        import torch
        self.torch, self.F = torch, torch.nn.functional
        tdt = {np.float32: torch.float32, np.float64: torch.float64}[np.dtype(dtype).type]
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / np.sqrt(H)

        def param(*shape, fill=None):
            t = (torch.full(shape, float(fill), dtype=tdt) if fill is not None
                 else (torch.rand(shape, generator=gen, dtype=tdt) * 2 - 1) * bound)
            return t.requires_grad_(True)
        self.w_ih, self.w_hh, self.b = param(4 * H, I), param(4 * H, H), param(4 * H)
        self.opts, self.H = opts, H
        if opts.get("peephole"):
            self.w_ci, self.w_cf, self.w_co = param(H), param(H), param(H)
        if opts.get("layer_norm"):
            self.ln = [(param(n, fill=1.0), param(n, fill=0.0)) for n in (4 * H, 4 * H, H)]
        self.x = torch.randn(T, B, I, generator=gen, dtype=tdt)
        self.dy = torch.randn(T, B, H, generator=gen, dtype=tdt)

    def fwd_bwd(self):
        torch, F, o, H = self.torch, self.F, self.opts, self.H
        T, B, I = self.x.shape
        zx = (self.x.reshape(T * B, I) @ self.w_ih.T).reshape(T, B, 4 * H)
        if o.get("layer_norm"):
            zx = F.layer_norm(zx, (4 * H,), *self.ln[0])
        p = o.get("recurrent_dropout", 0.0)
        mask = torch.bernoulli(torch.full((B, H), 1 - p, dtype=zx.dtype)) / (1 - p) if p else None
        pz = o.get("zoneout", 0.0), o.get("zoneout_cell", 0.0)
        zone = [torch.bernoulli(torch.full((T, B, H), q, dtype=zx.dtype)) for q in pz] \
            if any(pz) else None
        h = c = torch.zeros(B, H, dtype=zx.dtype)
        ys = []
        for t in range(T):
            zr = (h * mask if mask is not None else h) @ self.w_hh.T
            if o.get("layer_norm"):
                zr = F.layer_norm(zr, (4 * H,), *self.ln[1])
            zi, zf, zg, zo = (zx[t] + zr + self.b).chunk(4, 1)
            if o.get("peephole"):
                zi, zf = zi + self.w_ci * c, zf + self.w_cf * c
            cn = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
            if o.get("peephole"):
                zo = zo + self.w_co * cn
            cc = F.layer_norm(cn, (H,), *self.ln[2]) if o.get("layer_norm") else cn
            hn = torch.sigmoid(zo) * torch.tanh(cc)
            if zone is not None:
                zh, zc = zone[0][t], zone[1][t]
                cn, hn = zc * c + (1 - zc) * cn, zh * h + (1 - zh) * hn
            c, h = cn, hn
            ys.append(h)
        torch.stack(ys).backward(self.dy)


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# -- each library in its own process --------------------------------------------
# Inside one process OpenBLAS's and torch's OpenMP threads keep spinning after a call
# and steal the cores from the other library (one torch call read 82 ms in one run and
# 181 ms in another). So every implementation is timed by a worker process of its own,
# `python -m fastlstm.bench SPEC`, the workers alternated A B A B over rounds, and
# each ratio is taken round by round.

def _worker(spec):
    """Time the cases of `spec` in this process; returns {case key: median ms}."""
    out = {}
    if spec["kind"] == "ceiling":
        return {dt: matmul_gflops(dt) for dt in spec["dtypes"]}
    for key, (B, T, I, H, dtype) in spec["cases"].items():
        if spec["kind"] == "train":
            fn = TrainCase(spec["impl"], B, T, I, H, dtype).step
        elif spec["kind"] == "variants":
            opts = VARIANTS[key.split()[0]]
            fn = (TorchLoop(B, T, I, H, dtype, **opts) if spec["impl"] == "torch_loop"
                  else Case("fastlstm", B, T, I, H, dtype, **opts)).fwd_bwd
        else:
            fn = Case(spec["impl"], B, T, I, H, dtype, **spec["layer"]).fwd_bwd
        out[key] = median_time(fn, min_time=spec["min_time"]) * 1e3
    return out


def _run_worker(spec):
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "fastlstm.bench", json.dumps(spec)],
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


class TrainCase:
    """One training step (LSTM, linear head on the last step, MSE, Adam) for
    fastlstm or torch, on fixed random data."""

    def __init__(self, impl, B, T, I, H, dtype, seed=0):
        dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((B, T, I)).astype(dtype)
        y = rng.standard_normal((B, 1)).astype(dtype)
        self.impl = impl
        if impl == "torch":
            import torch
            tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype.type]
            self.lstm = torch.nn.LSTM(I, H, batch_first=True).to(tdt)
            self.head = torch.nn.Linear(H, 1).to(tdt)
            self.opt = torch.optim.Adam(list(self.lstm.parameters()) + list(self.head.parameters()),
                                        lr=1e-3)
            self.loss = torch.nn.MSELoss()
            self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        else:
            from .model import SequenceModel
            from .optim import Adam
            backend = "reference" if impl == "reference" else "fastlstm"
            self.model = SequenceModel(I, H, 1, dtype=dtype, seed=seed, backend=backend)
            self.opt = Adam(self.model, lr=1e-3)
            self.x, self.y = x, y

    def step(self):
        if self.impl == "torch":
            self.opt.zero_grad()
            out, _ = self.lstm(self.x)
            loss = self.loss(self.head(out[:, -1]), self.y)
            loss.backward()
            self.opt.step()
        else:
            self.model.train_step(self.x, self.y, self.opt)


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


if __name__ == "__main__":      # a timing worker: python -m fastlstm.bench SPEC
    import json
    import sys
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
