"""Moving trained models out: ONNX graphs (run by onnxruntime) and Keras weights.

torch needs no converter (parameter names and shapes are torch's). ONNX's ``LSTM``
operator expresses the layer: one node per layer (both directions in one node),
gate blocks reordered from torch's i, f, g, o to ONNX's i, o, f, c and the two
biases concatenated; packed-length semantics come from its ``sequence_lens``.
Peepholes are its ``P`` input. Options it cannot express (``proj_size``,
``cell_clip``: ONNX's ``clip`` bounds the gates' inputs, not the cell;
``layer_norm``; ``zoneout`` and ``zoneout_cell``, whose evaluation-mode expectation
mixes the previous state in) are refused by name. ``recurrent_dropout`` exports: in
evaluation, which the graph is, it is the identity.

Keras 3's ``LSTM`` keeps ``kernel (I, 4H)``, ``recurrent_kernel (H, 4H)`` and one
``bias (4H)`` in the gate order i, f, c, o: torch's order, transposed, with one bias.
Its ``recurrent_dropout`` is this layer's (weights only: the option is the caller's
to pass to both); it has no peepholes, layer normalisation or zoneout.
"""
import os

import numpy as np

from . import _options
from ._shared import atomic_write
from .lstm import LSTM

__all__ = ["export_onnx", "to_keras", "from_keras", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17
_ONNX_GATES = (0, 3, 1, 2)     # torch's (i, f, g, o) blocks in ONNX's order (i, o, f, c)


def _refuse(lstm, where, target):
    for option in _options.inexpressible(target):
        bad = getattr(lstm, option)
        if bad:
            raise ValueError(f"{where} cannot express {option}={bad!r}: export or convert a "
                             f"model without it")


def _layer(lstm):
    if not isinstance(lstm, LSTM):
        raise TypeError(f"expected a fastlstm LSTM layer, got {type(lstm).__name__}")
    return lstm


# -- ONNX -------------------------------------------------------------------------

class _Graph:
    """A small builder over onnx.helper: unique names, constants as initializers."""

    def __init__(self, onnx, dtype):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes, self.inits, self.n = [], [], 0
        self.elem = onnx.TensorProto.FLOAT if dtype == np.float32 else onnx.TensorProto.DOUBLE
        self.dtype = dtype

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, value, dtype=None):
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(
            np.asarray(value, dtype or self.dtype), name))
        return name

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs


def _onnx_weights(lstm, k):
    """W (D, 4H, I), R (D, 4H, H), B (D, 8H) or None, P (D, 3H) or None for layer k,
    in ONNX's gate order (P: i, o, f)."""
    H, D = lstm.hidden_size, lstm.num_directions
    order = np.concatenate([np.arange(g * H, (g + 1) * H) for g in _ONNX_GATES])
    W, R, B, P = [], [], [], []
    for d in range(D):
        sfx = f"_l{k}" + ("_reverse" if d else "")
        p = lstm.params
        W.append(p["weight_ih" + sfx][order])
        R.append(p["weight_hh" + sfx][order])
        if lstm.bias:
            B.append(np.concatenate([p["bias_ih" + sfx][order], p["bias_hh" + sfx][order]]))
        if lstm.peephole:
            P.append(np.concatenate([p[f"weight_c{g}" + sfx] for g in "iof"]))
    return (np.stack(W), np.stack(R), (np.stack(B) if lstm.bias else None),
            (np.stack(P) if lstm.peephole else None))


def _lstm_nodes(g, lstm, x_tm, lengths, h0=None, c0=None):
    """Nodes for every layer: time-major x (T, B, I) -> (y (T, B, D*H), h_n, c_n)."""
    H, D, L = lstm.hidden_size, lstm.num_directions, lstm.num_layers
    seq = g.op("Cast", [lengths], to=g.onnx.TensorProto.INT32)
    y, hs, cs = x_tm, [], []
    for k in range(L):
        W, R, B, P = _onnx_weights(lstm, k)
        inputs = [y, g.const("W", W), g.const("R", R), g.const("B", B) if B is not None else "",
                  seq]
        if h0 is not None:
            rows = dict(starts=[k * D], ends=[(k + 1) * D], axes=[0])
            sl = [g.const(n, v, np.int64) for n, v in rows.items()]
            inputs += [g.op("Slice", [h0, *sl]), g.op("Slice", [c0, *sl])]
        elif P is not None:
            inputs += ["", ""]                      # no initial state; P is the 8th input
        if P is not None:
            inputs.append(g.const("P", P))
        Y, Y_h, Y_c = g.op("LSTM", inputs, n_out=3, hidden_size=H,
                           direction="bidirectional" if D == 2 else "forward")
        hs.append(Y_h)
        cs.append(Y_c)
        y_tbdh = g.op("Transpose", [Y], perm=[0, 2, 1, 3])          # (T, B, D, H)
        y = g.op("Reshape", [y_tbdh, g.const("shape", [0, 0, D * H], np.int64)])
    h_n = hs[0] if L == 1 else g.op("Concat", hs, axis=0)
    c_n = cs[0] if L == 1 else g.op("Concat", cs, axis=0)
    return y, h_n, c_n


def export_onnx(model, path, opset=None):
    """Write `model` (an ``LSTM`` or a ``SequenceModel``) as an ONNX graph with dynamic
    T and B, checked by ``onnx.checker``.

    LSTM: inputs ``x`` (forward's layout), ``lengths`` (int64, (B,)), ``h0``, ``c0``;
    outputs ``y``, ``h_n``, ``c_n`` as ``forward`` returns them (evaluation mode).
    SequenceModel: inputs ``x`` (B, T, I), ``lengths``; output ``y`` as ``predict``.
    Returns the path. Raises ValueError for options the graph cannot express.
    """
    import onnx
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or os.PathLike), got "
                        f"{type(path).__name__}")
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        opset = DEFAULT_OPSET
    elif isinstance(opset, (bool, np.bool_)) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"opset must be an int, got {type(opset).__name__} {opset!r}")
    if not 14 <= opset <= newest:
        raise ValueError(f"opset must be in [14, {newest}] (14: the LSTM operator's layout "
                         f"argument; {newest}: the newest this onnx knows), got {opset}")
    opset = int(opset)
    sequence_model = hasattr(model, "lstm") and hasattr(model, "head")
    lstm = _layer(model.lstm if sequence_model else model)
    _refuse(lstm, "ONNX's LSTM operator", "onnx")
    g = _Graph(onnx, lstm.dtype)
    I, H, D, L = lstm.input_size, lstm.hidden_size, lstm.num_directions, lstm.num_layers
    F = D * H
    T_, B_ = "T", "B"
    batch_first = sequence_model or lstm.batch_first
    vi = onnx.helper.make_tensor_value_info
    inputs = [vi("x", g.elem, [B_, T_, I] if batch_first else [T_, B_, I]),
              vi("lengths", onnx.TensorProto.INT64, [B_])]
    x_tm = g.op("Transpose", ["x"], perm=[1, 0, 2]) if batch_first else "x"
    if sequence_model:
        y_tm, _, _ = _lstm_nodes(g, lstm, x_tm, "lengths")
        O = model.output_size
        if model.head == "last":
            last = g.op("Sub", ["lengths", g.const("one", [1], np.int64)])
            idx = g.op("Reshape", [last, g.const("shape", [1, -1, 1], np.int64)])
            idx = g.op("Expand", [idx, g.const("shape", [1, 1, F], np.int64)])
            feats = g.op("Squeeze", [g.op("GatherElements", [y_tm, idx], axis=0),
                                     g.const("axes", [0], np.int64)])          # (B, F)
            z = g.op("Gemm", [feats, g.const("W", model.W), g.const("b", model.b)], transB=1)
            out_shape = [B_, O]
        else:
            z = g.op("Add", [g.op("MatMul", [y_tm, g.const("Wt", model.W.T)]),
                             g.const("b", model.b)])                          # (T, B, O)
            z = g.op("Transpose", [z], perm=[1, 0, 2])
            out_shape = [B_, T_, O]
        link = {"mse": "Identity", "bce": "Sigmoid", "ce": "Softmax"}[model.loss]
        g.nodes.append(onnx.helper.make_node(link, [z], ["y"],
                                             **({"axis": -1} if link == "Softmax" else {})))
        outputs = [vi("y", g.elem, out_shape)]
    else:
        inputs += [vi("h0", g.elem, [D * L, B_, H]), vi("c0", g.elem, [D * L, B_, H])]
        y_tm, h_n, c_n = _lstm_nodes(g, lstm, x_tm, "lengths", "h0", "c0")
        y = g.op("Transpose", [y_tm], perm=[1, 0, 2]) if batch_first else y_tm
        for src, dst in ((y, "y"), (h_n, "h_n"), (c_n, "c_n")):
            g.nodes.append(onnx.helper.make_node("Identity", [src], [dst]))
        outputs = [vi("y", g.elem, [B_, T_, F] if batch_first else [T_, B_, F]),
                   vi("h_n", g.elem, [D * L, B_, H]), vi("c_n", g.elem, [D * L, B_, H])]
    graph = onnx.helper.make_graph(g.nodes, "fastlstm", inputs, outputs, g.inits)
    proto = onnx.helper.make_model(graph, producer_name="fastlstm",
                                   opset_imports=[onnx.helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return path


# -- Keras ------------------------------------------------------------------------

def to_keras(model):
    """Keras 3 weights of `model` (an ``LSTM`` or a ``SequenceModel``'s layer): one list
    per layer for ``keras.layers.LSTM(...).set_weights`` — ``[kernel, recurrent_kernel,
    bias]`` — or, bidirectional, for ``keras.layers.Bidirectional(...)``: the forward
    layer's three then the backward layer's. Without biases each list has two arrays
    (``use_bias=False``). Keras has one bias: it receives ``bias_ih + bias_hh``."""
    lstm = _layer(getattr(model, "lstm", model))
    _refuse(lstm, "Keras' LSTM", "keras")
    out = []
    for k in range(lstm.num_layers):
        layer = []
        for d in range(lstm.num_directions):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            p = lstm.params
            layer += [p["weight_ih" + sfx].T.copy(), p["weight_hh" + sfx].T.copy()]
            if lstm.bias:
                layer.append(p["bias_ih" + sfx] + p["bias_hh" + sfx])
        out.append(layer)
    return out


def _keras_layers(weights):
    """The Keras weights as a list (per layer) of lists of float arrays, every entry
    checked: a TypeError or ValueError names it as weights[k][j]."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)):
        raise TypeError("weights must be a list with one Keras LSTM layer (or its "
                        f"get_weights() list) per stacked layer, got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights must hold at least one layer")
    layers = []
    for k, w in enumerate(weights):
        if hasattr(w, "get_weights"):
            w = w.get_weights()
        if isinstance(w, (str, bytes)) or not isinstance(w, (list, tuple)):
            raise TypeError(f"weights[{k}] must be a Keras LSTM layer or its get_weights() "
                            f"list, got {type(w).__name__}")
        arrays = []
        for j, a in enumerate(w):
            arr = None if isinstance(a, (str, bytes)) else np.asarray(a)
            if arr is None or arr.dtype.kind != "f":
                got = type(a).__name__ if arr is None else f"dtype {arr.dtype}"
                raise TypeError(f"weights[{k}][{j}] must be a floating array, got {got}")
            arrays.append(arr)
        layers.append(arrays)
    lengths = [len(w) for w in layers]
    if lengths[0] not in (2, 3, 4, 6) or any(n != lengths[0] for n in lengths):
        raise ValueError("each layer's weights must be [kernel, recurrent_kernel(, bias)] "
                         "(twice for Bidirectional), the same for every layer; got lengths "
                         f"{lengths}")
    kernel = layers[0][0]
    if kernel.ndim != 2 or kernel.shape[1] % 4 or not kernel.size:
        raise ValueError(f"weights[0][0] (kernel) must have shape (input_size, 4 * units), "
                         f"got {kernel.shape}")
    return layers


def from_keras(weights, dtype=np.float32, batch_first=False, **options):
    """An ``LSTM`` holding the weights of Keras 3 layers.

    Parameters
    ----------
    weights : list
        One entry per stacked layer, each a Keras ``LSTM`` or ``Bidirectional(LSTM)``
        layer or its ``get_weights()`` list (3 arrays, 6 when bidirectional; 2 and 4
        with ``use_bias=False``).
    dtype, batch_first, **options
        As ``fastlstm.LSTM`` (``dropout``, ``seed``; ``forget_bias`` is Keras'
        ``unit_forget_bias``, an initialisation that the loaded weights replace).
    """
    for bad in _options.inexpressible("keras"):
        if options.get(bad):
            raise ValueError(f"Keras' LSTM has no {bad}: from_keras cannot make one")
    layers = _keras_layers(weights)
    first = layers[0]
    D = 2 if len(first) in (4, 6) else 1
    n = len(first) // D
    I, H = first[0].shape[0], first[0].shape[1] // 4
    for k, layer in enumerate(layers):
        I_k = I if k == 0 else D * H
        for d in range(D):
            for j, (what, shape) in enumerate((("kernel", (I_k, 4 * H)),
                                               ("recurrent_kernel", (H, 4 * H)),
                                               ("bias", (4 * H,)))[:n]):
                a = layer[d * n + j]
                if a.shape != shape:
                    name = f"weights[{k}][{d * n + j}] ({what}" + (
                        ", backward)" if d else ")")
                    raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    m = LSTM(I, H, num_layers=len(layers), bidirectional=D == 2, bias=n == 3,
             dtype=dtype, batch_first=batch_first, **options)
    state = {}
    for k, layer in enumerate(layers):
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            w = [np.asarray(a) for a in layer[d * n:(d + 1) * n]]
            state["weight_ih" + sfx] = w[0].T
            state["weight_hh" + sfx] = w[1].T
            if n == 3:
                state["bias_ih" + sfx] = w[2]
                state["bias_hh" + sfx] = np.zeros_like(w[2])
    m.load_state_dict(state)        # checks every shape against the layout
    return m
