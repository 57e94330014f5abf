"""fastlstm inside torch: ``LSTM``, a drop-in ``torch.nn.LSTM`` that runs on fastlstm's
kernels, and ``convert``, which puts it in place of every ``nn.LSTM`` of a model.

The layer is a torch custom operator (``fastlstm::lstm`` and ``fastlstm::lstm_backward``,
see ``_torch_ops``), so autograd, ``torch.compile(fullgraph=True)`` and torch's
optimizers see an ordinary op.

How it holds its state:

* The parameters are ``nn.Parameter`` views into one flat tensor, which fastlstm's
  layers read in place (no copy per call). When torch gives them new storage
  (``.double()``, ``load_state_dict(assign=True)``, ``copy.deepcopy``, unpickling) the
  next call notices (their data pointers moved) and binds them into a new flat tensor.
* Each forward runs on an engine (see ``_torch_ops``): one per forward waiting for its
  backward, one for forwards that keep nothing.
"""
import copy
import warnings

import numpy as np

try:
    import torch
    from torch import nn
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
except ImportError as e:          # pragma: no cover - torch is installed for the tests
    raise ImportError("fastlstm.torch needs PyTorch: pip install 'fastlstm[torch]' (it pins "
                      "the CPU build, torch==2.13.0)") from e

from . import _layout, _options
from ._torch_ops import _DTYPES, _MODULES, _eager, _Engine, _keys, _lstm

__all__ = ["LSTM", "convert"]


# -- the module -------------------------------------------------------------------------

class LSTM(nn.Module):
    """``torch.nn.LSTM`` on fastlstm's kernels (CPU, float32 or float64).

    Same signature, parameters (names, shapes, gate order), ``forward(input, hx=None)``
    (a tensor, batched or not, or a ``PackedSequence``) and outputs as ``nn.LSTM``, so
    ``state_dict`` moves between the two as it is. ``**options`` are fastlstm's own:
    ``peephole``, ``layer_norm``, ``zoneout``, ``zoneout_cell``, ``recurrent_dropout``,
    ``forget_bias``, ``cell_clip``, and ``threads`` (default: ``torch.get_num_threads()``
    at each call). ``max_pending``: forwards kept for a backward at once (see the module
    docstring)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 max_pending=8, **options):
        super().__init__()
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"fastlstm.torch.LSTM runs on the CPU, got device={device!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        threads = options.pop("threads", None)
        config = _options.layer_config(
            input_size, hidden_size, dtype=_DTYPES[dtype], threads=threads,
            num_layers=num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
            bidirectional=bidirectional, proj_size=proj_size, **options)
        for k in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                  "bidirectional", "proj_size"):
            setattr(self, k, config[k])
        self.mode = "LSTM"
        self.options = {k: config[k] for k in _options.DEFAULTS if k not in (
            "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")
            and config[k] != _options.DEFAULTS[k]}
        self.threads = config["threads"]
        self.max_pending = max_pending
        # fastlstm.LSTM's arguments (time-major always: the module transposes)
        self._fast_config = {k: config[k] for k in _options.DEFAULTS}
        self._fast_config.update(input_size=config["input_size"], batch_first=False,
                                 hidden_size=config["hidden_size"])
        H, D = config["hidden_size"], 2 if config["bidirectional"] else 1
        _, self._shapes = _layout.layer_blocks(config["input_size"], H, config["proj_size"] or H,
                                               config["num_layers"], D,
                                               *_options.param_flags(config))
        self._shape_list = [s for _, s in self._shapes]
        self._sizes = [int(np.prod(s)) for s in self._shape_list]
        ends = np.cumsum(self._sizes).tolist()
        self._slices = [(b - n, b, tuple(s)) for b, n, s in zip(ends, self._sizes,
                                                                  self._shape_list)]
        flat = torch.empty(sum(self._sizes), dtype=dtype)
        self._bind(flat)
        self.reset_parameters()

    # -- parameters -----------------------------------------------------------------

    def _bind(self, flat):
        """Make every parameter a view into `flat` (values kept when they exist)."""
        o = 0
        with torch.no_grad():
            for name, shape in self._shapes:
                n = int(np.prod(shape))
                view = flat[o:o + n].view(shape)
                p = self._parameters.get(name)
                if p is None:
                    self.register_parameter(name, nn.Parameter(view))
                else:
                    view.copy_(p.detach())
                    p.data = view
                o += n
        self._flat = flat
        self._ptrs = [p.data_ptr() for p in self._parameters.values()]
        self._engines, self._infer = [], None
        self._key = getattr(self, "_key", None) or next(_keys)
        _MODULES[self._key] = self

    def _check_binding(self):
        """Rebind when torch gave the parameters new storage (another dtype or device
        comes with new storage: the flat tensor keeps the old one alive)."""
        ps = self._parameters.values()
        if [p.data_ptr() for p in ps] != self._ptrs:
            dtypes = {p.dtype for p in ps}
            devices = {p.device.type for p in ps}
            if devices != {"cpu"}:
                raise RuntimeError(f"fastlstm.torch.LSTM runs on the CPU; its parameters are "
                                   f"on {sorted(devices)}")
            if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
                raise TypeError(f"fastlstm.torch.LSTM's parameters must all be float32 or all "
                                f"float64, got {sorted(map(str, dtypes))}")
            self._bind(torch.empty(self._flat.numel(), dtype=next(iter(dtypes))))

    def reset_parameters(self):
        """U(-1/sqrt(H), 1/sqrt(H)) from torch's generator, as ``nn.LSTM``; then
        fastlstm's forget bias and layer-norm gains (1) and biases (0)."""
        bound = 1.0 / self.hidden_size ** 0.5
        H, fb = self.hidden_size, self.options.get("forget_bias", 0.0)
        with torch.no_grad():
            for name, p in self._parameters.items():
                if name.startswith("ln_"):
                    p.fill_(1.0 if "_weight_" in name else 0.0)
                else:
                    p.uniform_(-bound, bound)
                    if fb and name.startswith("bias_ih"):
                        p[H:2 * H] += fb

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_engines"], state["_infer"] = [], None
        state["_ptrs"] = []                           # bound again on the first call
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._key = next(_keys)
        _MODULES[self._key] = self

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k not in ("_engines", "_infer", "_key"):
                setattr(new, k, copy.deepcopy(v, memo))
        new._engines, new._infer, new._ptrs = [], None, []
        new._key = next(_keys)
        _MODULES[new._key] = new
        return new

    # -- engines --------------------------------------------------------------------

    def _threads(self):
        return self.threads if self.threads is not None else torch.get_num_threads()

    def _take(self, keep):
        """A free engine for a forward (marked busy when it keeps its activations)."""
        if not keep:
            if self._infer is None or self._infer.lstm.threads != self._threads():
                self._infer = _Engine(self, -1)
            return self._infer
        threads = self._threads()
        for eng in self._engines:
            if not eng.busy:
                break
        else:
            if len(self._engines) < self.max_pending:
                eng = _Engine(self, len(self._engines))
                self._engines.append(eng)
            else:             # the oldest pending forward is taken back
                eng = min(self._engines, key=lambda e: e.generation)
        if eng.lstm.threads != threads:
            self._engines[eng.index] = eng = _Engine(self, eng.index)
        eng.generation = next(_keys)
        eng.busy, eng.leased = True, False
        return eng

    def _release(self, index, generation):
        if 0 <= index < len(self._engines):
            eng = self._engines[index]
            if eng.generation == generation:
                eng.busy = False

    def _engine_of(self, handle, index, generation):
        if index >= 0:                 # eager: the lease says which
            eng = self._engines[index] if index < len(self._engines) else None
            if eng is not None and eng.generation != generation:
                eng = None
        else:                          # compiled: the handle's storage says which
            ptr = handle.data_ptr()
            eng = next((e for e in self._engines if e.token == ptr), None)
        if eng is None or not eng.busy:
            raise RuntimeError(
                f"fastlstm.torch.LSTM: the activations of this forward were released: more "
                f"than max_pending={self.max_pending} forwards were waiting for a backward "
                f"(raise max_pending), or its graph was already freed")
        return eng

    # -- forward ------------------------------------------------------------------------

    def _check_tensor(self, name, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise RuntimeError(f"fastlstm.torch.LSTM runs on the CPU; {name} is on {t.device}")
        if t.dtype != self._flat.dtype:
            if t.dtype not in _DTYPES:
                raise TypeError(f"fastlstm.torch.LSTM takes float32 or float64; {name} is "
                                f"{t.dtype}")
            raise RuntimeError(f"{name} must have the module's dtype {self._flat.dtype}, got "
                               f"{t.dtype} (call .float() or .double() on one of them)")

    def forward(self, input, hx=None):
        compiling = torch.compiler.is_compiling()
        if not compiling:                        # compiled: torch guards the parameters
            self._check_binding()
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            sorted_idx, unsorted_idx = input.sorted_indices, input.unsorted_indices
            x, lengths = pad_packed_sequence(input)                # original order, (T, B, I)
            self._check_tensor("input", x)
            batched = True
        else:
            x = input
            self._check_tensor("input", x)
            if x.dim() not in (2, 3):
                raise RuntimeError(f"LSTM: Expected input to be 2D or 3D, got {x.dim()}D "
                                   f"instead")
            batched = x.dim() == 3
            if not batched:
                x = x.unsqueeze(1)
        bf = batched and self.batch_first and not packed
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {x.shape[-1]}")
        B = x.shape[0 if bf else 1]
        LD = self.num_layers * (2 if self.bidirectional else 1)
        P = self.proj_size or self.hidden_size
        h0 = c0 = None
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("hx must be a tuple (h_0, c_0) of two tensors")
            h0, c0 = hx
            for name, t, want in (("hx[0] (h_0)", h0, (LD, B, P)),
                                  ("hx[1] (c_0)", c0, (LD, B, self.hidden_size))):
                self._check_tensor(name, t)
                if not batched:
                    if t.dim() != 2:
                        raise RuntimeError(f"For unbatched 2-D input, {name} should also be "
                                           f"2-D but got {t.dim()}-D tensor")
                    t = t.unsqueeze(1)
                if tuple(t.shape) != want:
                    raise RuntimeError(f"Expected {name} size {want}, got {tuple(t.shape)}")
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        weights = list(self._parameters.values())
        keep = torch.is_grad_enabled() and (
            x.requires_grad or any(w.requires_grad for w in weights)
            or (h0 is not None and (h0.requires_grad or c0.requires_grad)))
        if compiling:
            y, h_n, c_n, _ = _lstm(x.transpose(0, 1) if bf else x, h0, c0, lengths, weights,
                                   self._key, self.training, keep)
            if bf:
                y = y.transpose(0, 1)
        else:       # batch-first in and out: no transposes in the graph
            y, h_n, c_n = _eager(x, h0, c0, lengths, self._key, self.training, keep, bf,
                                 *weights)
        if packed:
            out = _pack_like(y, lengths, sorted_idx, unsorted_idx)
            return out, (h_n, c_n)
        if not batched:
            return y.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return y, (h_n, c_n)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for k, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                           ("dropout", 0.0), ("bidirectional", False), ("proj_size", 0)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        for k, v in self.options.items():
            s += f", {k}={v!r}"
        return s

    # -- exchange with nn.LSTM ----------------------------------------------------

    @classmethod
    def from_torch(cls, lstm, **options):
        """A fastlstm.torch.LSTM with `lstm`'s configuration, weights and mode."""
        if type(lstm) is not nn.LSTM:
            raise TypeError(f"expected a torch.nn.LSTM, got {type(lstm).__name__}")
        p = next(lstm.parameters())
        if p.device.type != "cpu":
            raise ValueError(f"fastlstm.torch.LSTM runs on the CPU; this nn.LSTM is on "
                             f"{p.device}")
        new = cls(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers, bias=lstm.bias,
                  batch_first=lstm.batch_first, dropout=lstm.dropout,
                  bidirectional=lstm.bidirectional, proj_size=lstm.proj_size, dtype=p.dtype,
                  **options)
        new.load_state_dict(lstm.state_dict())
        return new.train(lstm.training)

    def to_torch(self):
        """A torch.nn.LSTM with this module's configuration, weights and mode (refused when
        a fastlstm option has no nn.LSTM equivalent)."""
        extra = {k: v for k, v in self.options.items() if k != "forget_bias"}
        if extra:
            raise ValueError(f"torch.nn.LSTM has no {', '.join(sorted(extra))}: this module "
                             f"cannot be converted")
        lstm = nn.LSTM(self.input_size, self.hidden_size, num_layers=self.num_layers,
                       bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                       bidirectional=self.bidirectional, proj_size=self.proj_size,
                       dtype=self._flat.dtype)
        lstm.load_state_dict(self.state_dict())
        return lstm.train(self.training)


def _pack_like(y, lengths, sorted_indices, unsorted_indices):
    """y (T, B, *) in the batch's original order as a PackedSequence laid out as the input
    was (the same sorted_indices and batch_sizes)."""
    if sorted_indices is not None:
        y, lengths = y.index_select(1, sorted_indices), lengths[sorted_indices.cpu()]
    packed = torch.nn.utils.rnn.pack_padded_sequence(y, lengths, enforce_sorted=True)
    return PackedSequence(packed.data, packed.batch_sizes, sorted_indices, unsorted_indices)


def convert(module, inplace=False):
    """Every ``torch.nn.LSTM`` of `module` (itself included) replaced by a
    ``fastlstm.torch.LSTM`` holding the same weights, in the same mode. Modules it cannot
    take (not on the CPU, not float32/float64, a subclass of nn.LSTM) are left alone with
    a warning that says why. Returns the converted module (a copy unless `inplace`)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not inplace:
        module = copy.deepcopy(module)
    left = []

    def swap(m, where):
        if type(m) is not nn.LSTM:
            if isinstance(m, nn.LSTM):
                left.append(f"{where} ({type(m).__name__}: a subclass, its own forward kept)")
            return None
        p = next(m.parameters())
        if p.device.type != "cpu":
            left.append(f"{where} (on {p.device}: fastlstm runs on the CPU)")
            return None
        if p.dtype not in _DTYPES:
            left.append(f"{where} ({p.dtype}: fastlstm takes float32 and float64)")
            return None
        return LSTM.from_torch(m)

    top = swap(module, "the module itself")
    if top is not None:
        module = top
    else:
        for name, parent in list(module.named_modules()):
            for child_name, child in list(parent.named_children()):
                new = swap(child, f"{name + '.' if name else ''}{child_name}")
                if new is not None:
                    setattr(parent, child_name, new)
    if left:
        warnings.warn("fastlstm.torch.convert left these nn.LSTMs alone: " + "; ".join(left),
                      stacklevel=2)
    return module
