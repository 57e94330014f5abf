"""asv suite: fastlstm, the NumPy reference and torch (when importable) at the
sizes of fastlstm.bench.SIZES, float32 and float64."""

from fastlstm.bench import SIZES, Case, TrainCase, flops, median_time, torch_available

DTYPES = ["float32", "float64"]


class _Base:
    params = [list(SIZES), DTYPES]
    param_names = ["size", "dtype"]
    impl = None

    def setup(self, size, dtype):
        if self.impl == "torch" and not torch_available():
            raise NotImplementedError("torch is not installed")   # asv: skipped
        B, T, I, H = SIZES[size]
        self.case = Case(self.impl, B, T, I, H, dtype)

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
    """Ratios and rates measured side by side in one process."""
    params = [list(SIZES), DTYPES]
    param_names = ["size", "dtype"]
    timeout = 300

    def setup(self, size, dtype):
        B, T, I, H = SIZES[size]
        self.shape = (B, T, I, H)
        self.fast = Case("fastlstm", B, T, I, H, dtype)
        self.ref = Case("reference", B, T, I, H, dtype)

    def track_speedup_over_reference(self, size, dtype):
        return (median_time(self.ref.fwd_bwd, min_time=0.1)
                / median_time(self.fast.fwd_bwd, min_time=0.1))
    track_speedup_over_reference.unit = "x"

    def track_gflops(self, size, dtype):
        return flops(*self.shape) / median_time(self.fast.fwd_bwd, min_time=0.1) / 1e9
    track_gflops.unit = "GFLOP/s"


class Stacked:
    """Two bidirectional layers at medium size: fastlstm against torch."""
    params = [["fastlstm", "torch"], DTYPES]
    param_names = ["impl", "dtype"]
    timeout = 300

    def setup(self, impl, dtype):
        if impl == "torch" and not torch_available():
            raise NotImplementedError("torch is not installed")
        B, T, I, H = SIZES["medium"]
        self.case = Case(impl, B, T, I, H, dtype, num_layers=2, bidirectional=True)

    def time_fwd_bwd(self, impl, dtype):
        self.case.fwd_bwd()


class TrainStep:
    """A whole training step: LSTM + linear head on the last step + MSE + Adam."""
    params = [["fastlstm", "reference", "torch"], ["seed", "small", "medium"], DTYPES]
    param_names = ["impl", "size", "dtype"]
    timeout = 300

    def setup(self, impl, size, dtype):
        if impl == "torch" and not torch_available():
            raise NotImplementedError("torch is not installed")
        self.case = TrainCase(impl, *SIZES[size], dtype)

    def time_train_step(self, impl, size, dtype):
        self.case.step()
