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

__all__ = ["article_data", "train_article"]


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
