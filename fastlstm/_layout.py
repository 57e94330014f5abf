"""Every flat buffer's layout, written once, as data (llm.c's parameter table).

A table row is ``(name, shape expression, present when)``. Shapes are written in
the sizes of one direction of one layer:

    T, B   time steps and sequences of the call
    I      the layer's input features (input_size, or D*P above layer 0)
    H      hidden units
    P      the recurrent state's width: proj_size, or H without a projection

and the third entry names the option a buffer belongs to (None: always there).
An absent buffer keeps its place with a first dimension of zero, so that Numba
sees one type whatever the options.

Everything else is derived from these tables: the sizes of the flat buffers,
the named tuples the kernels read (``_kernels`` compiles a carving function
from the same rows), the Python views and the ``state_dict`` names. Adding a
parameter or a buffer is one row here.
"""
import collections
import math

__all__ = ["PARAMS", "WORKSPACE", "DIMS", "FLAGS", "Params", "Workspace", "shape_of",
           "param_table", "param_size", "layer_blocks", "workspace_table", "workspace_size",
           "carve", "carving_source"]

#: One direction of one layer's parameters, in torch.nn.LSTM's order.
PARAMS = (
    ("weight_ih", "4 * H, I", None),
    ("weight_hh", "4 * H, P", None),
    ("bias_ih", "4 * H", "bias"),
    ("bias_hh", "4 * H", "bias"),
    ("weight_hr", "P, H", "proj"),
    ("weight_ci", "H", "peephole"),       # peepholes: c_{t-1} into i and f, c_t into o
    ("weight_cf", "H", "peephole"),
    ("weight_co", "H", "peephole"),
    ("ln_ih_weight", "4 * H", "layer_norm"),
    ("ln_ih_bias", "4 * H", "layer_norm"),
    ("ln_hh_weight", "4 * H", "layer_norm"),
    ("ln_hh_bias", "4 * H", "layer_norm"),
    ("ln_c_weight", "H", "layer_norm"),
    ("ln_c_bias", "H", "layer_norm"),
)

#: One direction of one layer's workspace for a (T, B) call. h and c hold the
#: initial state in entry 0 and step t's in entry t + 1. The rows whose shapes do not
#: hold T come first: calls of different T on one buffer (the segments of a recomputed
#: backward, see _parts) find them at the same place, the sums a backward carries over
#: from one segment to the next (dh, dc, db, dW's scratch) among them.
WORKSPACE = (
    ("rec", "B, 4 * H", None),          # h_{t-1} W_hh^T of one step
    ("w_hhT", "P, 4 * H", None),        # W_hh^T packed or contiguous (see lstm_forward)
    ("w_ih_pk", "4 * H, I", None),      # W_ih^T's panels (forward), W_ih's (backward)
    ("bias", "4 * H", None),            # b_ih + b_hh
    ("dm", "B, H", None),
    ("carry", "B, P", None),            # dh of finished sequences, passed through
    ("dh", "B, P", None),
    ("dc", "B, H", None),
    ("db", "4 * H", None),
    ("tmp_ih", "4 * H, I", None),       # weight-gradient GEMM outputs, added into the gradients
    ("tmp_hh", "4 * H, P", None),
    ("tmp_hr", "P, H", None),
    ("du", "B, H", "layer_norm"),       # gradient on LN_c's output, one step
    ("skip", "B, P", "zoneout"),        # dh's share that zoneout passes to h_{t-1}
    ("rmask", "B, P", "rdrop"),         # recurrent dropout's mask on h_{t-1}, per sequence
    # recompute: the backward's panels of W_hh and W_ih in buffers of their own, so that
    # a segment's recomputed forward and its backward do not pack them over each other
    ("w_hh_bk", "4 * H, P", "recompute"),
    ("w_ih_bk", "4 * H, I", "recompute"),
    # the steps
    ("x", "T, B, I", None),             # this direction's input (reversed in time for _reverse)
    ("gates", "T, B, 4 * H", None),     # activations i, f, g, o
    ("c", "T + 1, B, H", None),
    ("tanh_c", "T, B, H", None),
    ("m", "T, B, H", None),             # cell output o * tanh(c), before the projection
    ("h", "T + 1, B, P", None),
    ("y", "T, B, P", None),             # the output with padded steps zeroed
    ("dy", "T, B, P", None),
    ("dgates", "T, B, 4 * H", None),    # pre-activation gradients (step t in slot t % chunk)
    ("dx", "T, B, I", None),
    ("dhs", "T, B, P", None),           # the whole gradient on each h_t (as dgates)
    # layer normalisation: the normalised inputs of LN_ih, LN_hh and LN_c, and
    # 1 / sqrt(var + eps) of each (in that order) per step and sequence
    ("xn_ih", "T, B, 4 * H", "layer_norm"),
    ("xn_hh", "T, B, 4 * H", "layer_norm"),
    ("xn_c", "T, B, H", "layer_norm"),
    ("rstd", "T, B, 3", "layer_norm"),
    ("dxw", "T, B, 4 * H", "layer_norm"),    # gradient on x W_ih^T (LN_ih's input; as dgates)
    ("drec", "T, B, 4 * H", "layer_norm"),   # gradient on h W_hh^T (LN_hh's input; as dgates)
    # zoneout: the cell's new state before zoneout, and the weight each unit of h
    # and c gives its previous value (the 0/1 mask in training, p in evaluation)
    ("ct", "T, B, H", "zoneout"),
    ("zh", "T, B, P", "zoneout"),
    ("zc", "T, B, H", "zoneout"),
    # recurrent dropout: what W_hh saw, h_{t-1} * mask
    ("hd", "T, B, P", "rdrop"),
)

DIMS = ("T", "B", "I", "H", "P")
#: options a row may belong to, in the order the carving functions take them
FLAGS = ("bias", "proj", "peephole", "layer_norm", "zoneout", "rdrop", "recompute")
#: the options of each table, in that order
PARAM_FLAGS = ("bias", "proj", "peephole", "layer_norm")
WORKSPACE_FLAGS = ("layer_norm", "zoneout", "rdrop", "recompute")

Params = collections.namedtuple("Params", [r[0] for r in PARAMS])
Workspace = collections.namedtuple("Workspace", [r[0] for r in WORKSPACE])


def _terms(expr):
    return [t.strip() for t in expr.split(",")]


def shape_of(expr, **dims):
    """The shape tuple of a shape expression for the given sizes."""
    return tuple(int(eval(t, {"__builtins__": {}}, dims)) for t in _terms(expr))


def _present(table, names, flags):
    flags = dict(zip(names, flags))
    return [(name, expr) for name, expr, when in table if when is None or flags[when]]


def param_table(I, H, P, *flags):
    """[(name, shape)] of the parameters present, in torch's order (torch's own
    first). flags: bias, proj, peephole, layer_norm (missing ones are False)."""
    flags = flags + (False,) * (len(PARAM_FLAGS) - len(flags))
    return [(name, shape_of(expr, I=I, H=H, P=P))
            for name, expr in _present(PARAMS, PARAM_FLAGS, flags)]


def param_size(I, H, P, *flags):
    """Elements of one direction of one layer's parameters."""
    return sum(math.prod(s) for _, s in param_table(I, H, P, *flags))


def layer_blocks(input_size, H, P, num_layers, D, *flags):
    """A whole (stacked, D-directional) LSTM's parameters: ([(offset, size, I_k)] per
    layer and direction, [(torch name, shape)] of every parameter in torch's order).
    flags as param_table's. Made from the sizes alone, so that a checkpoint's arrays
    can be checked against its config before a model is built."""
    blocks, names, offset = [], [], 0
    for k in range(num_layers):
        I_k = input_size if k == 0 else D * P
        table = param_table(I_k, H, P, *flags)
        size = sum(math.prod(shape) for _, shape in table)
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            blocks.append((offset, size, I_k))
            names += [(name + sfx, shape) for name, shape in table]
            offset += size
    return blocks, names


def workspace_table(T, B, I, H, P, *flags):
    """[(name, shape)] of one direction's workspace for a (T, B) call; absent
    buffers are left out. flags: layer_norm, zoneout, rdrop, recompute (missing: False)."""
    flags = flags + (False,) * (len(WORKSPACE_FLAGS) - len(flags))
    return [(name, shape_of(expr, T=T, B=B, I=I, H=H, P=P))
            for name, expr in _present(WORKSPACE, WORKSPACE_FLAGS, flags)]


def workspace_size(T, B, I, H, P, *flags):
    """Elements of the workspace one (T, B) call of one direction needs."""
    return sum(math.prod(s) for _, s in workspace_table(T, B, I, H, P, *flags))


def carve(flat, table):
    """{name: view of flat} for a [(name, shape)] table, packed in order."""
    out, at = {}, 0
    for name, shape in table:
        n = math.prod(shape)
        out[name] = flat[at:at + n].reshape(shape)
        at += n
    if at != flat.size:
        raise ValueError(f"the layout needs {at} elements, the buffer has {flat.size}")
    return out


def carving_source(fname, table, tuple_name, dims, bits=False):
    """Source of a Numba-compilable ``fname(flat, *dims, has_<flag>...)`` returning the
    named tuple of views: offsets written out, so nothing is allocated per call. With
    `bits`, ``fname(flat, *dims, opts)`` instead: flag k is bit k of opts (FLAGS' order,
    the kernels' option bits). The namespace it runs in provides ``_view(flat, offset,
    shape)``, the C-ordered view ``flat[offset:offset + prod(shape)].reshape(shape)``."""
    flags = [f for f in FLAGS if any(when == f for _, _, when in table)]
    if bits:
        lines = [f"def {fname}({', '.join(['flat', *dims, 'opts'])}):"]
        lines += [f"    has_{f} = opts & {1 << FLAGS.index(f)} != 0" for f in flags]
    else:
        lines = [f"def {fname}({', '.join(['flat', *dims, *(f'has_{f}' for f in flags)])}):"]
    lines.append("    o = 0")
    for name, expr, when in table:
        terms = _terms(expr)
        if when is not None:               # absent: the same rank, no elements
            terms[0] = f"({terms[0]}) if has_{when} else 0"
        shape = ", ".join(f"({t})" for t in terms)
        size = " * ".join(f"({t})" for t in terms)
        lines.append(f"    n = {size}")
        lines.append(f"    {name} = _view(flat, o, ({shape},))")
        lines.append("    o += n")
    lines.append("    if o > flat.shape[0]:")       # _view does not check: one compare here
    lines.append(f"        raise ValueError('{tuple_name}: the flat buffer is smaller than "
                 "its layout')")
    lines.append(f"    return {tuple_name}({', '.join(r[0] for r in table)})")
    return "\n".join(lines)
