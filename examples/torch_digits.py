"""A torch model no one wrote for fastlstm, trained twice from the same weights: once
with torch.nn.LSTM and once after fastlstm.torch.convert.

scikit-learn's digits (1,797 8x8 images, shipped inside the package) read as sequences
of 8 rows: each pixel's intensity (0-16) through an nn.Embedding, a row's 8 embeddings
as one step, a 2-layer bidirectional nn.LSTM, nn.Linear on the last step, cross-entropy,
AdamW. Prints the loss curves' largest relative difference and both runs' time per step.

    python examples/torch_digits.py [--dtype float64] [--steps 60]
    python examples/torch_digits.py --time nn.LSTM        # one run alone, for timing
    python examples/torch_digits.py --time fastlstm.torch   # (each in its own process)
"""
import argparse
import copy
import time

import numpy as np
import torch


class Digits(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.embed = torch.nn.Embedding(17, 4, dtype=dtype)
        self.lstm = torch.nn.LSTM(32, 32, num_layers=2, bidirectional=True, batch_first=True,
                                  dtype=dtype)
        self.head = torch.nn.Linear(64, 10, dtype=dtype)

    def forward(self, x):                       # x (N, 8, 8) int64 intensities
        steps = self.embed(x).flatten(2)        # (N, 8 rows, 8 pixels * 4)
        out, _ = self.lstm(steps)
        return self.head(out[:, -1])


def data():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.from_numpy(d.images.astype(np.int64)), torch.from_numpy(d.target)


def train(model, x, y, steps, batch=64, seed=0):
    """Losses and the median seconds per step of `steps` AdamW steps on minibatches."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, times = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return np.array(losses), float(np.median(times))


def run(dtype=torch.float64, steps=60):
    import fastlstm.torch
    x, y = data()
    torch.manual_seed(0)
    model = Digits(dtype)
    converted = fastlstm.torch.convert(copy.deepcopy(model))
    want, t_torch = train(model, x, y, steps)
    got, t_fast = train(converted, x, y, steps)
    return want, got, t_torch, t_fast


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--time", choices=["nn.LSTM", "fastlstm.torch"],
                   help="train only this model and print its median ms per step")
    a = p.parse_args()
    if a.time:
        x, y = data()
        torch.manual_seed(0)
        model = Digits(getattr(torch, a.dtype))
        if a.time == "fastlstm.torch":
            import fastlstm.torch
            model = fastlstm.torch.convert(model)
        _, t = train(model, x, y, a.steps)
        print(f"{a.time} {a.dtype} median step {t * 1e3:.3f} ms")
        return
    want, got, t_torch, t_fast = run(getattr(torch, a.dtype), a.steps)
    rel = np.max(np.abs(got - want) / np.abs(want))
    print(f"digits, {a.dtype}, {a.steps} AdamW steps of 64: loss {want[0]:.4f} -> {want[-1]:.4f} "
          f"(nn.LSTM), {got[0]:.4f} -> {got[-1]:.4f} (converted); largest relative "
          f"difference of the loss curves {rel:.2e}; median step {t_torch * 1e3:.2f} ms "
          f"(nn.LSTM) vs {t_fast * 1e3:.2f} ms (fastlstm.torch), {t_torch / t_fast:.2f}x")


if __name__ == "__main__":
    main()
