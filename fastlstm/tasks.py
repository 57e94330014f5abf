"""Built-in training tasks.

``article``: the example of the article fastlstm grew from: sequences of 3 steps
with 2 features, an LSTM with 3 hidden units, binary classification through a
logistic output on the last hidden state, plain gradient descent with learning
rate 0.01.
"""
import time

import numpy as np

from .lstm import LSTM
from .reference import ReferenceLSTM, sigmoid

__all__ = ["article_data", "train_article", "adding_data", "sine_data"]


def adding_data(n, T, rng, dtype=np.float32):
    """The adding problem of Hochreiter & Schmidhuber (1997), experiment 4.

    Each step is a pair (value in U[-1, 1], marker). A sequence's length is
    uniform in [T, T + T/10]; one of its first ten pairs and one other of its
    first T/2 - 1 pairs are marked 1.0; the first and last pairs carry marker -1
    unless marked (the first pair's value is then zero). The target, read at the
    end, is 0.5 + (X1 + X2) / 4 for the two marked values.

    Returns x (n, T + T//10, 2), padded with zeros, y (n, 1) and lengths (n,).
    """
    T_max = T + T // 10
    lengths = rng.integers(T, T_max + 1, n)
    x = np.zeros((n, T_max, 2), dtype)
    x[:, :, 0] = rng.uniform(-1, 1, (n, T_max))
    x[np.arange(T_max)[None, :] >= lengths[:, None], 0] = 0
    rows = np.arange(n)
    x[rows, 0, 1] = -1
    x[rows, lengths - 1, 1] = -1
    first = rng.integers(0, min(10, T), n)
    span = max(T // 2 - 1, 2)
    second = rng.integers(0, span - 1, n)
    second = second + (second >= first)              # any of the first span, but not `first`
    x[rows, first, 1] = 1.0
    x[rows, second, 1] = 1.0
    x[(first == 0) | (second == 0), 0, 0] = 0.0
    y = (0.5 + (x[rows, first, 0] + x[rows, second, 0]) / 4).astype(dtype)[:, None]
    return x, y, lengths


def sine_data(n, T, rng, dtype=np.float32, horizon=1, noise=0.05):
    """Forecasting a noisy sum of two sines: x (n, T, 1) the series, y (n, T, 1)
    the value `horizon` steps later at every step (sequence -> sequence)."""
    t = np.arange(T + horizon)[None, :]
    f1, f2 = rng.uniform(0.02, 0.1, (n, 1)), rng.uniform(0.1, 0.3, (n, 1))
    p1, p2 = rng.uniform(0, 2 * np.pi, (n, 1)), rng.uniform(0, 2 * np.pi, (n, 1))
    s = np.sin(2 * np.pi * f1 * t + p1) + 0.5 * np.sin(2 * np.pi * f2 * t + p2)
    s = s + noise * rng.standard_normal(s.shape)
    return (s[:, :T, None].astype(dtype), s[:, horizon:, None].astype(dtype))


def article_data(batch=8, seed=0, dtype=np.float64):
    """x (3, batch, 2) and labels (batch,): a sequence is labelled 1 when its
    first feature rises from the first step to the last."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (3, batch, 2)).astype(dtype)
    labels = (x[-1, :, 0] > x[0, :, 0]).astype(dtype)
    return x, labels


def train_article(steps=3000, lr=0.01, backend="fastlstm", seed=0, dtype=np.float64,
                  report_every=None, out=print):
    """Train the article's example by full-batch gradient descent.

    Returns a dict with the loss history, the final accuracy and the median
    seconds per training step.
    """
    x, labels = article_data(dtype=dtype)
    T, B, I = x.shape
    H = 3
    cls = LSTM if backend == "fastlstm" else ReferenceLSTM
    lstm = cls(I, H, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    w = rng.uniform(-1 / np.sqrt(H), 1 / np.sqrt(H), H).astype(dtype)   # logistic head
    b = np.zeros((), dtype)
    dy = np.zeros((T, B, H), dtype)
    losses, times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        lstm.zero_grad()
        y, _ = lstm.forward(x)
        h_last = y[-1]
        p = sigmoid(h_last @ w + b)
        eps = np.finfo(dtype).tiny
        loss = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
        dlogit = (p - labels) / B                 # d(mean BCE)/d(logit)
        dy[-1] = np.outer(dlogit, w)
        dw, db = h_last.T @ dlogit, dlogit.sum()
        lstm.backward(dy)
        for k in lstm.params:                     # plain gradient descent
            lstm.params[k] -= lr * lstm.grads[k]
        w -= lr * dw
        b -= lr * db
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if report_every and (step % report_every == 0 or step == steps - 1):
            out(f"  step {step:5d}  loss {loss:.4f}")
    y, _ = lstm.forward(x)
    pred = sigmoid(y[-1] @ w + b) > 0.5
    return dict(losses=losses, accuracy=float(np.mean(pred == labels.astype(bool))),
                step_seconds=float(np.median(times)))
