"""Timing fastlstm against the NumPy reference and torch.nn.LSTM.

Used by ``fastlstm bench`` and by the asv suite. Every ratio is taken from
medians measured side by side in one process.
"""
import time

import numpy as np

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


def flops(B, T, I, H):
    """FLOPs of one forward+backward, counting the matrix products only."""
    return 2 * T * B * (I + H) * 4 * H * 3


def median_time(fn, min_time=0.2, min_repeats=5, max_repeats=1000):
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < min_time
                                       and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_gflops(dtype, n=2048, min_time=0.5):
    """The ceiling: GFLOP/s of an n x n ``a @ a`` in this process."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    return 2 * n ** 3 / median_time(lambda: a @ a, min_time=min_time, min_repeats=3) / 1e9


class Case:
    """One (implementation, size, dtype) with ``forward``, ``backward`` and ``fwd_bwd`` callables."""

    def __init__(self, impl, B, T, I, H, dtype, seed=0):
        dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((T, B, I)).astype(dtype)
        self.dy = rng.standard_normal((T, B, H)).astype(dtype)
        self.impl = impl
        if impl == "torch":
            import torch
            tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype.type]
            self.model = torch.nn.LSTM(I, H).to(tdt)
            self.x = torch.from_numpy(self.x).requires_grad_(True)
            self.dy = torch.from_numpy(self.dy)
        else:
            cls = LSTM if impl == "fastlstm" else ReferenceLSTM
            self.model = cls(I, H, dtype=dtype, seed=seed)
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
