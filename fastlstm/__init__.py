"""fastlstm: LSTM training on the CPU with Numba kernels in preallocated buffers.

``fastlstm.LSTM`` is the public layer (torch.nn.LSTM's parameters and gate
order); ``fastlstm.reference`` is the same maths in plain NumPy, the oracle and
the speed baseline.
"""
from . import reference
from .inference import Inference
from .interop import export_onnx, from_keras, to_keras
from .lstm import LSTM
from .model import SequenceModel, load
from .optim import OPTIMIZERS, clip_grad_norm
from .plot import plot_bench, plot_history
from .tasks import compile_kernels

globals().update(OPTIMIZERS)        # fastlstm.SGD, fastlstm.Adam, ...: every optimizer class

__all__ = ["LSTM", "SequenceModel", "Inference", "load", *OPTIMIZERS, "clip_grad_norm", "reference",
           "export_onnx", "from_keras", "to_keras", "plot_history", "plot_bench",
           "compile_kernels", "__version__"]
__version__ = "0.2.0"
