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
           "param_table", "param_size", "workspace_table", "workspace_size", "carve",
           "carving_source"]

#: One direction of one layer's parameters, in torch.nn.LSTM's order.
PARAMS = (
    ("weight_ih", "4 * H, I", None),
    ("weight_hh", "4 * H, P", None),
    ("bias_ih", "4 * H", "bias"),
    ("bias_hh", "4 * H", "bias"),
    ("weight_hr", "P, H", "proj"),
)

#: One direction of one layer's workspace for a (T, B) call. h and c hold the
#: initial state in entry 0 and step t's in entry t + 1.
WORKSPACE = (
    ("x", "T, B, I", None),             # this direction's input (reversed in time for _reverse)
    ("gates", "T, B, 4 * H", None),     # activations i, f, g, o
    ("c", "T + 1, B, H", None),
    ("tanh_c", "T, B, H", None),
    ("m", "T, B, H", None),             # cell output o * tanh(c), before the projection
    ("h", "T + 1, B, P", None),
    ("rec", "B, 4 * H", None),          # h_{t-1} W_hh^T of one step
    ("bias", "4 * H", None),            # b_ih + b_hh
    ("y", "T, B, P", None),             # the output with padded steps zeroed
    ("dy", "T, B, P", None),
    ("dgates", "T, B, 4 * H", None),    # pre-activation gradients
    ("dx", "T, B, I", None),
    ("dhs", "T, B, P", None),           # the whole gradient on each h_t
    ("dm", "B, H", None),
    ("carry", "B, P", None),            # dh of finished sequences, passed through
    ("dh", "B, P", None),
    ("dc", "B, H", None),
    ("db", "4 * H", None),
    ("tmp_ih", "4 * H, I", None),       # weight-gradient GEMM outputs, added into the gradients
    ("tmp_hh", "4 * H, P", None),
    ("tmp_hr", "P, H", None),
)

DIMS = ("T", "B", "I", "H", "P")
#: options a row may belong to, in the order the carving functions take them
FLAGS = ("bias", "proj")

Params = collections.namedtuple("Params", [r[0] for r in PARAMS])
Workspace = collections.namedtuple("Workspace", [r[0] for r in WORKSPACE])


def _terms(expr):
    return [t.strip() for t in expr.split(",")]


def shape_of(expr, **dims):
    """The shape tuple of a shape expression for the given sizes."""
    return tuple(int(eval(t, {"__builtins__": {}}, dims)) for t in _terms(expr))


def param_table(I, H, P, bias, proj):
    """[(name, shape)] of the parameters present, in torch's order."""
    flags = dict(bias=bias, proj=proj)
    return [(name, shape_of(expr, I=I, H=H, P=P)) for name, expr, when in PARAMS
            if when is None or flags[when]]


def param_size(I, H, P, bias, proj):
    """Elements of one direction of one layer's parameters."""
    return sum(math.prod(s) for _, s in param_table(I, H, P, bias, proj))


def workspace_table(T, B, I, H, P):
    """[(name, shape)] of one direction's workspace for a (T, B) call."""
    return [(name, shape_of(expr, T=T, B=B, I=I, H=H, P=P)) for name, expr, _ in WORKSPACE]


def workspace_size(T, B, I, H, P):
    """Elements of the workspace one (T, B) call of one direction needs."""
    return sum(math.prod(s) for _, s in workspace_table(T, B, I, H, P))


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


def carving_source(fname, table, tuple_name, dims):
    """Source of a Numba-compilable ``fname(flat, *dims, has_<flag>...)`` returning the
    named tuple of views: offsets written out, so nothing is allocated per call."""
    flags = [f for f in FLAGS if any(when == f for _, _, when in table)]
    args = ", ".join(["flat", *dims, *(f"has_{f}" for f in flags)])
    lines = [f"def {fname}({args}):", "    o = 0"]
    for name, expr, when in table:
        terms = _terms(expr)
        if when is not None:               # absent: the same rank, no elements
            terms[0] = f"({terms[0]}) if has_{when} else 0"
        shape = ", ".join(f"({t})" for t in terms)
        size = " * ".join(f"({t})" for t in terms)
        lines.append(f"    n = {size}")
        lines.append(f"    {name} = flat[o:o + n].reshape(({shape},))")
        lines.append("    o += n")
    lines.append(f"    return {tuple_name}({', '.join(r[0] for r in table)})")
    return "\n".join(lines)
