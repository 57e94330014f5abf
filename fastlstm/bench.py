"""Timing fastlstm against the NumPy reference and torch.nn.LSTM.

Used by ``fastlstm bench`` (the asv suite has its own harness, benchmarks/common.py).
Every ratio is taken from medians measured side by side in one process.
"""

import time
from functools import partial

import numpy as np

from ._profile import gemm_parts
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


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def bench_table(sizes, dtypes, min_time=0.2, progress=None, **layer):
    """Median fwd+bwd seconds for every implementation at every (size, dtype),
    with the matmul ceiling of each dtype, all measured in this process.
    Layer options (num_layers, bidirectional, proj_size) leave the reference
    out: it is one layer, one direction."""
    layer = {k: v for k, v in layer.items() if v and not (k == "num_layers" and v == 1)}
    impls = [i for i in IMPLS if (i != "torch" or torch_available())
             and (i != "reference" or not layer)]
    rows, ceilings = [], {}
    total = len(sizes) * len(dtypes) * len(impls)
    done = 0
    for dtype in dtypes:
        dtype = np.dtype(dtype)
        ceilings[dtype.name] = matmul_gflops(dtype)
        for name, (B, T, I, H) in sizes.items():
            row = dict(size=name, B=B, T=T, I=I, H=H, dtype=dtype.name, **layer)
            for impl in impls:
                if progress:
                    done += 1
                    progress(f"[{done}/{total}] {name} {dtype.name} {impl}")
                case = Case(impl, B, T, I, H, dtype, **layer)
                row[f"{impl}_ms"] = median_time(case.fwd_bwd, min_time=min_time) * 1e3
            fast = row["fastlstm_ms"]
            row["gflops"] = flops(B, T, I, H, **layer) / (fast * 1e-3) / 1e9
            row["ceiling_pct"] = 100 * row["gflops"] / ceilings[dtype.name]
            if "reference_ms" in row:
                row["vs_reference"] = row["reference_ms"] / fast
            if "torch_ms" in row:
                row["vs_torch"] = row["torch_ms"] / fast
            rows.append(row)
    return dict(rows=rows, matmul_gflops=ceilings)


def format_table(result):
    nan = float("nan")
    lines = ["matmul ceiling (2048x2048 a @ a): " + ", ".join(
        f"{k} {v:.0f} GF/s" for k, v in result["matmul_gflops"].items()),
        f"{'size':8} {'dtype':8} {'fastlstm ms':>12} {'reference ms':>13} {'torch ms':>10} "
        f"{'x ref':>7} {'x torch':>8} {'GF/s':>7} {'% ceil':>7}"]
    for r in result["rows"]:
        lines.append(
            f"{r['size']:8} {r['dtype']:8} {r['fastlstm_ms']:12.3f} "
            f"{r.get('reference_ms', nan):13.3f} {r.get('torch_ms', nan):10.3f} "
            f"{r.get('vs_reference', nan):7.2f} {r.get('vs_torch', nan):8.2f} "
            f"{r['gflops']:7.1f} {r['ceiling_pct']:7.1f}")
    return "\n".join(lines)


def profile(B, T, I, H, dtype, min_time=0.2):
    """Split one fwd+bwd into its parts, for fastlstm and the reference.

    The GEMM parts are timed alone, each the way its implementation runs it
    (fastlstm: through Numba's BLAS; the reference: NumPy's); "elementwise and
    the rest" is the whole fwd+bwd minus them.
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
        parts = gemm_parts(impl, x, h, hs, dz, w_ih, w_hh, T, B, min_time)
        total = median_time(Case(impl, B, T, I, H, dtype).fwd_bwd, min_time=min_time)
        parts["elementwise and the rest"] = max(total - sum(parts.values()), 0.0)
        parts["total"] = total
        out[impl] = {k: v * 1e3 for k, v in parts.items()}
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


def train_table(sizes, dtypes, min_time=0.2, progress=None):
    """Median seconds of one training step, fastlstm, the reference backend and
    torch side by side, at every (size, dtype)."""
    impls = [i for i in IMPLS if i != "torch" or torch_available()]
    rows = []
    total, done = len(sizes) * len(dtypes) * len(impls), 0
    for dtype in dtypes:
        for name, (B, T, I, H) in sizes.items():
            row = dict(size=name, B=B, T=T, I=I, H=H, dtype=np.dtype(dtype).name)
            for impl in impls:
                done += 1
                if progress:
                    progress(f"[{done}/{total}] train step {name} {np.dtype(dtype).name} {impl}")
                row[f"{impl}_ms"] = median_time(TrainCase(impl, B, T, I, H, dtype).step,
                                                min_time=min_time) * 1e3
            row["vs_reference"] = row["reference_ms"] / row["fastlstm_ms"]
            if "torch_ms" in row:
                row["vs_torch"] = row["torch_ms"] / row["fastlstm_ms"]
            rows.append(row)
    return dict(rows=rows)


def format_train_table(result):
    nan = float("nan")
    lines = ["one training step: LSTM + linear head on the last step + MSE + Adam",
             f"{'size':8} {'dtype':8} {'fastlstm ms':>12} {'reference ms':>13} {'torch ms':>10} "
             f"{'x ref':>7} {'x torch':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['size']:8} {r['dtype']:8} {r['fastlstm_ms']:12.3f} "
                     f"{r['reference_ms']:13.3f} {r.get('torch_ms', nan):10.3f} "
                     f"{r['vs_reference']:7.2f} {r.get('vs_torch', nan):8.2f}")
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
