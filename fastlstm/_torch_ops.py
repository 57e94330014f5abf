"""fastlstm.torch's computation: the torch custom operators ``fastlstm::lstm`` and
``fastlstm::lstm_backward`` (``torch.library.custom_op`` with ``register_autograd`` and
fake implementations, for ``torch.compile``), the eager path beside them (an
``autograd.Function``), and the engines they run on. The module (``fastlstm.torch.LSTM``)
registers itself in ``_MODULES`` under a key the operators take.

A forward that will be differentiated runs on an *engine* of its own (a ``fastlstm.LSTM``
bound to the module's flat parameters, with its own workspace), which keeps that
forward's activations until autograd frees the graph: several forwards before one
backward each backpropagate through their own. An engine is handed back when its graph
node is freed (eager) or after its backward (compiled); at most ``max_pending`` are
kept, and a backward through an engine that was taken back raises. A forward that will
not be differentiated runs on a separate engine and keeps nothing.
"""
import itertools
import threading
import weakref

import numpy as np
import torch

from ._openmp import lend
from ._threads import parallel_worthwhile, usable_cores
from .lstm import LSTM as _FastLSTM

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: key -> the module (weakly): the custom ops find their module by its key
_MODULES = weakref.WeakValueDictionary()
_keys = itertools.count(1)
#: (key, engine, generation) of the last forward this thread ran, for its setup_context:
#: reading the handle tensor there would be an op, which opcheck's schema mode refuses
_taken = threading.local()


def _module(key):
    m = _MODULES.get(key)
    if m is None:
        raise RuntimeError("this fastlstm.torch.LSTM no longer exists")
    return m


class _Engine:
    """A fastlstm.LSTM bound to a module's flat parameters, with gradients of its own."""

    def __init__(self, module, index):
        flat = module._flat.detach().numpy()
        lstm = _FastLSTM(**module._fast_config, dtype=flat.dtype, threads=module._threads())
        saved = flat.copy()            # bind copies lstm's own initial values in: put ours back
        lstm.bind(flat, np.zeros_like(flat))
        flat[:] = saved
        self.lstm, self.index = lstm, index
        self.generation = 0
        self.busy = False
        self.leased = False            # eager: a _Lease in the graph node gives it back
        self.token = None              # the data pointer of the last forward's handle
        self.threads_at = {}           # (T, B, keep) -> _threads_of: a few us a call saved


class _Lease:
    """Held by the autograd node of one forward: when the node is freed, the engine that
    keeps that forward's activations is free again."""

    def __init__(self, module, index, generation):
        self.module, self.index, self.generation = weakref.ref(module), index, generation

    def __del__(self):
        m = self.module()
        if m is not None:
            m._release(self.index, self.generation)


def _threads_of(eng, T, B, keep):
    """The threads a call of `eng`'s LSTM at (T, B) runs on: 1 when it splits neither its
    batch, its units nor its two directions (see fastlstm._threads)."""
    n = eng.threads_at.get((T, B, keep))
    if n is None:
        n = eng.threads_at[(T, B, keep)] = _count_threads(eng.lstm, T, B, keep)
    return n


def _count_threads(lstm, T, B, keep):
    if (len(lstm._split(T, B)) > 1 or (not keep and lstm._units_split)
            or (keep and lstm._train_columns(T, B) > 1)
            or (lstm.num_directions == 2 and parallel_worthwhile(
                T * B * 4 * lstm.hidden_size * (lstm.input_size + lstm._P), lstm.threads))):
        return min(lstm.threads, usable_cores())
    return 1


# -- the computation, and the custom operators around it -----------------------------------

def _forward_impl(x, h0, c0, lengths, key, training, keep, bf=False):
    """x (T, B, I) time-major, or (B, T, I) with `bf`: y (in x's layout), h_n, c_n (new
    tensors) and the engine that ran it."""
    m = _module(key)
    eng = m._take(keep)
    lstm = eng.lstm
    lstm.training = training
    state = None if h0 is None else (h0.detach().numpy(), c0.detach().numpy())
    lens = None if lengths is None else lengths.detach().numpy()
    xn = x.detach().numpy()
    if bf:
        xn = xn.transpose(1, 0, 2)
    y, (h_n, c_n) = lend(_threads_of(eng, xn.shape[0], xn.shape[1], keep), lambda: lstm.forward(
        xn, state=state, lengths=lens, keep=bool(keep)))
    if bf:
        y = y.transpose(1, 0, 2)
    return (torch.from_numpy(np.array(y)), torch.from_numpy(np.array(h_n)),
            torch.from_numpy(np.array(c_n)), eng)


def _backward_impl(dy, dh_n, dc_n, eng, m, bf=False, need_dx=True):
    """dx, dh0, dc0 and the flat parameters' gradient (ndarrays, new) through `eng`'s
    forward; dy and dx batch-first with `bf`; dx None unless `need_dx`. dy, dh_n, dc_n
    may be None (zeros: an output the loss did not use)."""
    lstm = eng.lstm
    lstm.zero_grad()
    last = lstm._last
    D = lstm.num_directions
    LD, P, H = lstm.num_layers * D, lstm._P, lstm.hidden_size
    dstate = None
    if dh_n is not None or dc_n is not None:
        dh = np.zeros((LD, last.B, P), lstm.dtype) if dh_n is None else dh_n.detach().numpy()
        dc = np.zeros((LD, last.B, H), lstm.dtype) if dc_n is None else dc_n.detach().numpy()
        if dh.any() or dc.any():
            dstate = (dh, dc)
    last.thread = threading.get_ident()   # autograd may run it on another thread
    if dy is None:
        dyn = np.zeros((last.T, last.B, D * P), lstm.dtype)
    else:
        dyn = dy.detach().numpy()
        if bf:
            dyn = dyn.transpose(1, 0, 2)
    dx, (dh0, dc0) = lend(_threads_of(eng, last.T, last.B, True),
                           lambda: lstm.backward(dyn, dstate=dstate, input_grad=need_dx))
    if dx is not None:
        dx = np.array(dx.transpose(1, 0, 2) if bf else dx)
    out = dx, np.array(dh0), np.array(dc0), lstm.flat_grads.copy()
    if not eng.leased:                # compiled: nothing else gives it back
        m._release(eng.index, eng.generation)
    return out


class _Eager(torch.autograd.Function):
    """The eager path: the same computation as the custom operators, through an
    autograd.Function instead of custom_op's argument handling (pytree flattening,
    defaults, redispatch): at seed size the wrapper's cost per fwd+bwd went from about
    330 us to 115, and lower since 4b0fae7 (``fastlstm bench --torch-module`` prints the
    current figure). torch.compile takes the operators."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, key, training, keep, bf, *weights):
        y, h_n, c_n, eng = _forward_impl(x, h0, c0, lengths, key, training, keep, bf)
        ctx.key, ctx.has_state, ctx.bf = key, h0 is not None, bf
        # an output the loss does not use comes back as None, not as zeros torch made
        ctx.set_materialize_grads(False)
        if keep:
            eng.leased = True
            ctx.lease = _Lease(_module(key), eng.index, eng.generation)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if torch.is_grad_enabled():
            raise RuntimeError("fastlstm.torch.LSTM does not support double backward "
                               "(create_graph=True), nor do torch's own fused RNNs")
        m = _module(ctx.key)
        lease = ctx.lease
        eng = m._engine_of(None, lease.index, lease.generation)
        # no dx when the input needs none (data): the first layer skips its product
        dx, dh0, dc0, dflat = _backward_impl(dy, dh_n, dc_n, eng, m, ctx.bf,
                                             ctx.needs_input_grad[0])
        # numpy's views, then one from_numpy each: torch.split and Tensor.view took 21 us
        # of a seed-size backward, these 5
        dweights = [torch.from_numpy(dflat[a:b].reshape(s)) for a, b, s in m._slices]
        dx = None if dx is None else torch.from_numpy(dx)
        if not ctx.has_state:
            return (dx, None, None, None, None, None, None, None, *dweights)
        return (dx, torch.from_numpy(dh0), torch.from_numpy(dc0), None, None, None, None, None,
                *dweights)


def _eager(*args):
    """_Eager.apply without autograd.Function.apply's Python wrapper where no functorch
    transform is active: that wrapper's argument handling cost 5 us of a 38 us forward
    at seed size. Its one effect then, unwrapping tensors that outlived a transform, is
    done here for the tensors a caller gives (x, h0, c0)."""
    if torch._C._are_functorch_transforms_active():
        return _Eager.apply(*args)
    unwrap = torch._C._functorch.unwrap_if_dead
    x, h0, c0 = args[:3]
    return _apply_eager(unwrap(x), h0 if h0 is None else unwrap(h0),
                        c0 if c0 is None else unwrap(c0), *args[3:])


_apply_eager = super(torch.autograd.Function, _Eager).apply


@torch.library.custom_op("fastlstm::lstm", mutates_args=())
def _lstm(x: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None,
          lengths: torch.Tensor | None, weights: list[torch.Tensor], key: int, training: bool,
          keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, B, I) time-major; returns y, h_n, c_n and a handle: a one-element tensor,
    always 0, whose storage names the engine that keeps the activations (its value is the
    same every call, so that the op's outputs are a function of its inputs)."""
    y, h_n, c_n, eng = _forward_impl(x, h0, c0, lengths, key, training, keep)
    handle = torch.from_numpy(np.zeros(1, np.int64))   # no dispatcher op inside the op
    eng.token = handle.data_ptr()     # unique while the handle lives: the graph keeps it
    _taken.value = (key, eng.index, eng.generation)
    return y, h_n, c_n, handle


@_lstm.register_fake
def _lstm_fake(x, h0, c0, lengths, weights, key, training, keep):
    m = _module(key)
    T, B = x.shape[0], x.shape[1]
    LD, P = m.num_layers * (2 if m.bidirectional else 1), m.proj_size or m.hidden_size
    return (x.new_empty((T, B, LD // m.num_layers * P)), x.new_empty((LD, B, P)),
            x.new_empty((LD, B, m.hidden_size)), x.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("fastlstm::lstm_backward", mutates_args=())
def _lstm_backward(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor,
                   handle: torch.Tensor, key: int, index: int, generation: int,
                   need_dx: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (empty unless need_dx), dh0, dc0 and the gradient of the flat parameters,
    through the forward that ran on engine (index, generation) (eager, from its lease)
    or, index -1 (compiled), whose handle this is. need_dx defaults to True: a graph
    torch.compile cached before it existed calls the operator without it."""
    m = _module(key)
    dx, *out = _backward_impl(dy, dh_n, dc_n, m._engine_of(handle, index, generation), m,
                              need_dx=need_dx)
    return (dy.new_empty((0,)) if dx is None else torch.from_numpy(dx),
            *(torch.from_numpy(a) for a in out))


@_lstm_backward.register_fake
def _lstm_backward_fake(dy, dh_n, dc_n, handle, key, index, generation, need_dx=True):
    m = _module(key)
    T, B = dy.shape[0], dy.shape[1]
    return (dy.new_empty((T, B, m.input_size) if need_dx else (0,)),
            dh_n.new_empty(dh_n.shape), dc_n.new_empty(dc_n.shape),
            dy.new_empty((m._flat.numel(),)))


def _setup_context(ctx, inputs, output):
    x, h0, c0, lengths, weights, key, training, keep = inputs
    handle = output[3]
    ctx.key, ctx.has_state = key, h0 is not None
    ctx.shapes = [w.shape for w in weights]
    ctx.save_for_backward(handle)
    if not keep:
        return
    m = _MODULES.get(key)
    taken = getattr(_taken, "value", None)
    if m is not None and type(handle) is torch.Tensor and taken and taken[0] == key:  # eager
        _, index, generation = taken
        _taken.value = None
        m._engines[index].leased = True
        ctx.lease = _Lease(m, index, generation)


def _backward(ctx, dy, dh_n, dc_n, dhandle):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("fastlstm.torch.LSTM does not support double backward "
                           "(create_graph=True), nor do torch's own fused RNNs")
    handle, = ctx.saved_tensors
    lease = getattr(ctx, "lease", None)
    index, generation = (lease.index, lease.generation) if lease else (-1, 0)
    need_dx = bool(ctx.needs_input_grad[0])
    dx, dh0, dc0, dflat = _lstm_backward(dy, dh_n, dc_n, handle, ctx.key, index, generation,
                                         need_dx)
    sizes = [int(np.prod(s)) for s in ctx.shapes]
    dweights = [g.view(s) for g, s in zip(torch.split(dflat, sizes), ctx.shapes)]
    if not ctx.has_state:
        dh0 = dc0 = None
    return dx if need_dx else None, dh0, dc0, None, dweights, None, None, None


torch.library.register_autograd("fastlstm::lstm", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastlstm.torch.LSTM does not support double backward (nor do "
                       "torch's own fused RNNs)")


def _setup_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd("fastlstm::lstm_backward", _no_double_backward,
                                setup_context=_setup_nothing)
