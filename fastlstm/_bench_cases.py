"""The cases `fastlstm bench` times: one (implementation, size, dtype) each, built on
fixed random data in the process that times it (see _bench_worker).

TorchLoop is the variants' torch peer: the same layer written as a torch user writes
a variant torch.nn.LSTM lacks. The asv suite keeps its own copy (benchmarks/common.py):
asv times past commits too, so the suite imports nothing but the public API.
"""
import numpy as np

from . import _options
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
        elif impl == "torch-int8":       # torch's dynamically quantized LSTM (weights int8)
            import torch
            from torch.ao.quantization import quantize_dynamic
            self.model = quantize_dynamic(torch.nn.LSTM(I, H, **layer), {torch.nn.LSTM},
                                          dtype=torch.qint8).eval()
            self.x = torch.from_numpy(self.x)
            self.dy = None
            self.impl = "torch"
        elif impl == "fastlstm":
            self.model = LSTM(I, H, dtype=dtype, seed=seed, **layer)
        elif impl == "fastlstm-bf16":     # bfloat16 weights (fastlstm.Inference): inference only
            from .inference import Inference
            self.model = Inference(LSTM(I, H, dtype=dtype, seed=seed, **layer),
                                   weights="bfloat16")
            self.impl = "fastlstm"
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

    def infer(self):
        """A forward in evaluation mode, as a server runs it: torch under no_grad,
        fastlstm's layer through ``fastlstm.Inference`` (float32 weights)."""
        if isinstance(self.model, LSTM):
            from .inference import Inference
            self.model = Inference(self.model)
        elif hasattr(self.model, "eval"):   # an Inference has evaluation semantics
            self.model.eval()
        if self.impl == "torch":
            import torch
            with torch.no_grad():
                self.model(self.x.detach())
        else:
            self.model.forward(self.x)


#: DeepBench's LSTM sizes (baidu-research/DeepBench, code/kernels/rnn_problems.h) with
#: H <= 2048, as (H, B, T); input size = H. Training: forward+backward; inference
#: ("server" set): a forward in evaluation mode.
DEEPBENCH_TRAIN = tuple((H, B, 25) for H in (512, 1024, 2048) for B in (16, 32, 64, 128)) + \
    tuple((1536, B, 50) for B in (8, 16, 32)) + tuple((256, B, 150) for B in (16, 32, 64))
DEEPBENCH_INFER = tuple((H, B, T) for H, T in ((512, 25), (1024, 25), (2048, 25), (1536, 50),
                                               (256, 150)) for B in (1, 2, 4))

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


class TorchModuleCase:
    """One step of a torch training loop around an LSTM: the module (``nn.LSTM``, impl
    "torch", or ``fastlstm.torch.LSTM`` with the same initial weights, impl "fastlstm"),
    ``nn.Linear`` on the last step (on h_n for a PackedSequence), ``MSELoss``,
    ``torch.optim.Adam``: zero_grad, forward, backward, step. `packed`: the batch as a
    PackedSequence of lengths drawn uniformly in [T/10, T]."""

    def __init__(self, impl, B, T, I, H, dtype, packed=False, seed=0):
        import torch
        tdt = {np.float32: torch.float32, np.float64: torch.float64}[np.dtype(dtype).type]
        torch.manual_seed(seed)
        lstm = torch.nn.LSTM(I, H, batch_first=True, dtype=tdt)
        if impl == "fastlstm":
            from . import torch as fastlstm_torch
            lstm = fastlstm_torch.LSTM.from_torch(lstm)
        head = torch.nn.Linear(H, 1, dtype=tdt)
        opt = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), lr=1e-3)
        x, y = torch.randn(B, T, I, dtype=tdt), torch.randn(B, 1, dtype=tdt)
        loss = torch.nn.MSELoss()
        if packed:
            lengths = torch.from_numpy(np.random.default_rng(seed).integers(max(T // 10, 1),
                                                                            T + 1, B))
            x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                        enforce_sorted=False)

        def step():
            opt.zero_grad()
            out, (h, _) = lstm(x)
            loss(head(h[-1] if packed else out[:, -1]), y).backward()
            opt.step()
        self.step = step


class TorchOverheadCase:
    """One fwd+bwd at (B, T, I, H), time-major, the input requiring its gradient, of:
    "module", ``fastlstm.torch.LSTM`` (``y.backward(dy)``); "fastlstm", the
    ``fastlstm.LSTM`` it runs on, alone; "floor", a do-nothing ``autograd.Function`` with
    the module's signature and outputs (new tensors of y's, the states' and the
    gradients' shapes), what any Python autograd op costs. module - fastlstm - floor is
    the wrapper's own cost: its checks, copies and bookkeeping."""

    def __init__(self, impl, B, T, I, H, dtype, seed=0):
        import torch
        dt = np.dtype(dtype).type
        tdt = {np.float32: torch.float32, np.float64: torch.float64}[dt]
        torch.manual_seed(seed)
        x = torch.randn(T, B, I, dtype=tdt, requires_grad=True)
        dy = torch.randn(T, B, H, dtype=tdt)
        if impl == "fastlstm":
            layer = LSTM(I, H, dtype=dt)
            xn, dyn = x.detach().numpy(), dy.numpy()

            def step():
                layer.forward(xn)
                layer.backward(dyn)
        else:
            from . import torch as fastlstm_torch
            module = fastlstm_torch.LSTM(I, H, dtype=tdt)
            if impl == "module":
                def step():
                    module(x)[0].backward(dy)
            else:
                floor = _floor_function(torch, (T, B, H), (1, B, H), (T, B, I),
                                        [tuple(p.shape) for p in module.parameters()])

                def step():
                    floor.apply(x, None, None, None, 0, True, True, False,
                                *module.parameters())[0].backward(dy)
        self.step = step


def _floor_function(torch, y_shape, state_shape, x_shape, weight_shapes):
    """A do-nothing autograd.Function with fastlstm.torch's signature: new tensors out."""
    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, h0, c0, lengths, key, training, keep, bf, *weights):
            ctx.set_materialize_grads(False)
            return x.new_empty(y_shape), x.new_empty(state_shape), x.new_empty(state_shape)

        @staticmethod
        def backward(ctx, dy, dh, dc):
            return (dy.new_empty(x_shape), None, None, None, None, None, None, None,
                    *[dy.new_empty(s) for s in weight_shapes])
    return Floor
