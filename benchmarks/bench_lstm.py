"""asv suite: fastlstm, the NumPy reference and torch (when importable) at every
size and dtype. Its harness is benchmarks/common.py, not the package under test."""
from .common import (
    CASES,
    DTYPES,
    SIZES,
    FastCase,
    ReferenceCase,
    TorchLoop,
    TrainCase,
    flops,
    median_time,
    need_torch,
    skip,
)


class _Base:
    params = [list(SIZES), DTYPES]
    param_names = ["size", "dtype"]
    impl = None
    timeout = 300

    def setup(self, size, dtype):
        self.case = CASES[self.impl](*SIZES[size], dtype)

    def time_forward(self, size, dtype):
        self.case.forward()

    def time_backward(self, size, dtype):
        self.case.backward()

    def time_fwd_bwd(self, size, dtype):
        self.case.fwd_bwd()

    def peakmem_fwd_bwd(self, size, dtype):
        self.case.fwd_bwd()


class FastLSTM(_Base):
    impl = "fastlstm"


class Reference(_Base):
    impl = "reference"


class Torch(_Base):
    impl = "torch"


class Speedup:
    """Ratios and rates measured side by side in one process (fastlstm and the
    NumPy reference share numpy's BLAS; torch is timed in its own benchmarks)."""
    params = [list(SIZES), DTYPES]
    param_names = ["size", "dtype"]
    timeout = 300

    def setup(self, size, dtype):
        self.shape = SIZES[size]
        self.fast = FastCase(*self.shape, dtype)
        self.ref = ReferenceCase(*self.shape, dtype)

    def track_speedup_over_reference(self, size, dtype):
        return median_time(self.ref.fwd_bwd) / median_time(self.fast.fwd_bwd)
    track_speedup_over_reference.unit = "x"

    def track_gflops(self, size, dtype):
        return flops(*self.shape) / median_time(self.fast.fwd_bwd) / 1e9
    track_gflops.unit = "GFLOP/s"


class Stacked:
    """Two bidirectional layers at medium size: fastlstm against torch."""
    params = [["fastlstm", "torch"], DTYPES]
    param_names = ["impl", "dtype"]
    timeout = 300

    def setup(self, impl, dtype):
        self.case = CASES[impl](*SIZES["medium"], dtype, num_layers=2, bidirectional=True)

    def time_fwd_bwd(self, impl, dtype):
        self.case.fwd_bwd()


class TrainStep:
    """A whole training step: LSTM + linear head on the last step + MSE + Adam."""
    params = [["fastlstm", "reference", "torch"], ["seed", "small", "medium"], DTYPES]
    param_names = ["impl", "size", "dtype"]
    timeout = 300

    def setup(self, impl, size, dtype):
        self.case = TrainCase(impl, *SIZES[size], dtype)

    def time_train_step(self, impl, size, dtype):
        self.case.step()


class Threads:
    """The batch split over threads (fastlstm.LSTM(threads=...), skipped on commits
    that lack it): one thread against one per core, float32."""
    params = [["small", "long", "medium"], [1, 2]]
    param_names = ["size", "threads"]
    timeout = 300

    def setup(self, size, threads):
        self.case = FastCase(*SIZES[size], "float32", threads=threads)

    def time_fwd_bwd(self, size, threads):
        self.case.fwd_bwd()


class BigLayerTraining:
    """fwd+bwd at DeepBench's training size H = 1024, B = 16, T = 25 (input = H), float32:
    a layer large for its batch (W_hh holds 1 MiB a sequence), which fastlstm trains
    split by hidden units over the cores (_columns_train), against torch.nn.LSTM."""
    params = [["fastlstm", "torch"]]
    param_names = ["impl"]
    timeout = 300

    def setup(self, impl):
        self.case = CASES[impl](16, 25, 1024, 1024, "float32")
        self.case.fwd_bwd()

    def time_fwd_bwd(self, impl):
        self.case.fwd_bwd()


class Recompute:
    """recompute=K (fastlstm.LSTM(recompute=...), skipped on commits that lack it): the
    time and the peak memory of fwd+bwd against keeping every step, float32, at long and
    at ten times its T (where keeping every step takes about 330 MB)."""
    params = [["None", "10", "sqrt"], ["long", "long_x10"]]
    param_names = ["recompute", "size"]
    timeout = 300

    def setup(self, recompute, size):
        B, T, I, H = SIZES["long"]
        T *= 10 if size == "long_x10" else 1
        layer = {} if recompute == "None" else dict(
            recompute=recompute if recompute == "sqrt" else int(recompute))
        self.case = FastCase(B, T, I, H, "float32", **layer)

    def time_fwd_bwd(self, recompute, size):
        self.case.fwd_bwd()

    def peakmem_fwd_bwd(self, recompute, size):
        self.case.fwd_bwd()


#: the LSTM variants, as options of fastlstm.LSTM (skipped where a commit lacks them)
VARIANTS = {
    "plain": {},
    "peephole": dict(peephole=True),
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=0.1, zoneout_cell=0.1),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
}


class Variants:
    """Each variant's fwd+bwd in training mode, float32: fastlstm, and the same layer
    written as a torch-autograd step loop (``common.TorchLoop``, the peer a torch user
    has for these)."""
    params = [["fastlstm", "torch_loop"], list(VARIANTS), ["small", "medium"]]
    param_names = ["impl", "variant", "size"]
    timeout = 300

    def setup(self, impl, variant, size):
        if impl == "fastlstm":
            self.case = FastCase(*SIZES[size], "float32", **VARIANTS[variant])
            return
        need_torch()
        self.case = TorchLoop(*SIZES[size], "float32", **VARIANTS[variant])

    def time_fwd_bwd(self, impl, variant, size):
        self.case.fwd_bwd()


class TorchModule:
    """A torch training loop's step (the module, nn.Linear on the last step, MSE, Adam)
    with torch.nn.LSTM and with fastlstm.torch.LSTM holding the same initial weights
    (skipped where a commit has no fastlstm.torch), float32."""
    params = [["nn.LSTM", "fastlstm.torch"], ["seed", "small", "long"]]
    param_names = ["module", "size"]
    timeout = 300

    def setup(self, module, size):
        torch = need_torch()
        B, T, I, H = SIZES[size]
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(I, H, batch_first=True)
        if module == "fastlstm.torch":
            try:
                import fastlstm.torch as ft
            except ImportError:
                skip("this fastlstm has no fastlstm.torch")
            lstm = ft.LSTM.from_torch(lstm)
        head = torch.nn.Linear(H, 1)
        opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-3)
        x, y = torch.randn(B, T, I), torch.randn(B, 1)

        def step():
            opt.zero_grad()
            out, _ = lstm(x)
            ((head(out[:, -1]) - y) ** 2).mean().backward()
            opt.step()
        self.step = step
        step()

    def time_train_step(self, module, size):
        self.step()


class Serving:
    """An evaluation forward at DeepBench's inference size H = 1024, B = 1, T = 25 (input
    = H): fastlstm.Inference with float32 and bfloat16 weights, and torch.nn.LSTM under
    no_grad; skipped where a commit has no fastlstm.Inference (or bfloat16 weights)."""
    params = [["fastlstm", "fastlstm-bf16", "torch"]]
    param_names = ["impl"]
    timeout = 300

    def setup(self, impl):
        import numpy as np
        B, T, H = 1, 25, 1024
        x = np.random.default_rng(0).standard_normal((T, B, H)).astype(np.float32)
        if impl == "torch":
            torch = need_torch()
            lstm = torch.nn.LSTM(H, H).eval()
            xt = torch.from_numpy(x)

            def forward():
                with torch.no_grad():
                    lstm(xt)
        else:
            serve = _inference(impl, H, H, 1)
            forward = lambda: serve.forward(x)      # noqa: E731
        self.forward = forward
        forward()

    def time_forward(self, impl):
        self.forward()


class Stream:
    """A live stream's step, B = 1: fastlstm.Inference(...).stream(1).step with float32
    and bfloat16 weights at one small layer (I = 32, H = 64) and two larger ones (I = H =
    256); fastlstm bench --stream times torch and onnxruntime one step at a time."""
    params = [["fastlstm", "fastlstm-bf16"], ["32,64,1", "256,256,2"]]
    param_names = ["impl", "size"]
    timeout = 300

    def setup(self, impl, size):
        import numpy as np
        I, H, L = map(int, size.split(","))
        s = _inference(impl, I, H, L).stream(1)
        x_t = np.ones((1, I), np.float32)
        self.step = lambda: s.step(x_t)
        self.step()

    def time_step(self, impl, size):
        self.step()


def _inference(impl, I, H, L):
    try:
        from fastlstm import LSTM, Inference
        return Inference(LSTM(I, H, num_layers=L, seed=0),
                         weights="bfloat16" if impl == "fastlstm-bf16" else "float32")
    except (ImportError, NotImplementedError):
        skip("this fastlstm has no Inference with these weights")
