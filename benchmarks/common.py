"""The asv suite's own harness. It imports nothing from fastlstm but the public API
that has existed since the first release (``fastlstm.LSTM(input_size, hidden_size,
dtype=, seed=)`` with ``forward(x)``/``backward(dy)``, ``fastlstm.reference.forward``/
``backward``), so that ``asv run`` over past commits measures them all the same way;
later additions (layer options, SequenceModel, optimizers) are asked for by name and
their benchmarks skipped where a commit lacks them. Do not change what a benchmark
times: that would change what its old numbers meant."""
import time

import numpy as np

#: name: (B, T, I, H)
SIZES = {
    "seed": (1, 3, 2, 3),
    "small": (32, 50, 32, 64),
    "long": (8, 1000, 16, 64),
    "medium": (64, 100, 128, 256),
    "large": (128, 100, 512, 512),
}
DTYPES = ["float32", "float64"]


def skip(reason):
    """asv counts a benchmark whose setup raises NotImplementedError as skipped."""
    raise NotImplementedError(reason)


def need_torch():
    try:
        import torch
    except ImportError:
        skip("torch is not installed")
    return torch


def flops(B, T, I, H):
    """FLOPs of one forward+backward of one plain layer, matrix products only."""
    return 2 * T * B * (I + H) * 4 * H * 3


def median_time(fn, min_time=0.1, min_repeats=5):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def data(B, T, I, H, dtype, out=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dy = rng.standard_normal((T, B, out or H)).astype(dtype)
    return x, dy


class FastCase:
    """fastlstm.LSTM: forward, backward and both."""

    def __init__(self, B, T, I, H, dtype, **layer):
        import fastlstm
        D = 2 if layer.get("bidirectional") else 1
        self.x, self.dy = data(B, T, I, H, dtype, out=D * H)
        try:
            self.model = fastlstm.LSTM(I, H, dtype=np.dtype(dtype), seed=0, **layer)
        except TypeError:
            skip(f"this fastlstm has no {sorted(layer)}")
        self.forward()

    def forward(self):
        self.model.forward(self.x)

    def backward(self):
        self.model.backward(self.dy)

    def fwd_bwd(self):
        self.model.forward(self.x)
        self.model.backward(self.dy)


class ReferenceCase(FastCase):
    """fastlstm.reference's functions: the NumPy baseline."""

    def __init__(self, B, T, I, H, dtype):
        from fastlstm import reference
        self.ref = reference
        self.x, self.dy = data(B, T, I, H, dtype)
        rng = np.random.default_rng(1)
        bound = 1 / np.sqrt(H)
        self.w = [rng.uniform(-bound, bound, s).astype(dtype)
                  for s in [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]]
        self.zeros = np.zeros((B, H), dtype)
        self.forward()

    def forward(self):
        self.cache = self.ref.forward(self.x, self.zeros, self.zeros, *self.w)[2]

    def backward(self):
        self.ref.backward(self.dy, self.zeros, self.zeros, self.cache)

    def fwd_bwd(self):
        self.forward()
        self.backward()


class TorchCase(FastCase):
    """torch.nn.LSTM autograd, the peer (asv runs every benchmark in its own process)."""

    def __init__(self, B, T, I, H, dtype, **layer):
        torch = need_torch()
        D = 2 if layer.get("bidirectional") else 1
        x, dy = data(B, T, I, H, dtype, out=D * H)
        self.model = torch.nn.LSTM(I, H, **layer).to(getattr(torch, dtype))
        self.x = torch.from_numpy(x).requires_grad_(True)
        self.dy = torch.from_numpy(dy)
        self.forward()

    def forward(self):
        self.y = self.model(self.x)[0]

    def backward(self):
        self.y.backward(self.dy, retain_graph=True)

    def fwd_bwd(self):
        self.model(self.x)[0].backward(self.dy)


CASES = {"fastlstm": FastCase, "reference": ReferenceCase, "torch": TorchCase}


class TrainCase:
    """One training step: LSTM, linear head on the last step, MSE, Adam."""

    def __init__(self, impl, B, T, I, H, dtype):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((B, T, I)).astype(dtype)
        y = rng.standard_normal((B, 1)).astype(dtype)
        if impl == "torch":
            torch = need_torch()
            self.lstm = torch.nn.LSTM(I, H, batch_first=True).to(getattr(torch, dtype))
            self.head = torch.nn.Linear(H, 1).to(getattr(torch, dtype))
            self.opt = torch.optim.Adam([*self.lstm.parameters(), *self.head.parameters()],
                                        lr=1e-3)
            self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
            self.step = self._torch_step
            return
        import fastlstm
        if not hasattr(fastlstm, "SequenceModel"):
            skip("this fastlstm has no SequenceModel")
        kw = {} if impl == "fastlstm" else dict(backend="reference")
        try:
            model = fastlstm.SequenceModel(I, H, 1, dtype=np.dtype(dtype), seed=0, **kw)
        except (TypeError, ValueError):
            skip(f"this fastlstm has no {impl} backend")
        opt = fastlstm.Adam(model, lr=1e-3)
        self.step = lambda: model.train_step(x, y, opt)

    def _torch_step(self):
        self.opt.zero_grad()
        out, _ = self.lstm(self.x)
        ((self.head(out[:, -1]) - self.y) ** 2).mean().backward()
        self.opt.step()


class TorchLoop:
    """The same layer written with torch autograd ops, a step loop as a torch user
    writes a variant that torch.nn.LSTM lacks (torch.nn.LSTMCell's maths, the input
    projection of all steps in one product, functional layer_norm, masks drawn by
    torch.bernoulli each call); training mode, one layer, one direction. The suite's
    copy of fastlstm's own peer (fastlstm/_bench_cases.py): the suite imports nothing
    but the public API."""

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
