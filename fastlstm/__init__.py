"""fastlstm: LSTM training on the CPU with Numba kernels in preallocated buffers.

``fastlstm.LSTM`` is the public layer (torch.nn.LSTM's parameters and gate
order); ``fastlstm.reference`` is the same maths in plain NumPy, the oracle and
the speed baseline.
"""
from . import reference
from .interop import export_onnx, from_keras, to_keras
from .lstm import LSTM
from .model import SequenceModel, load
from .optim import OPTIMIZERS, clip_grad_norm

globals().update(OPTIMIZERS)        # fastlstm.SGD, fastlstm.Adam, ...: every optimizer class

__all__ = ["LSTM", "SequenceModel", "load", *OPTIMIZERS, "clip_grad_norm", "reference",
           "export_onnx", "from_keras", "to_keras", "__version__"]
__version__ = "0.2.0"
