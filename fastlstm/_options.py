"""The layer's options, one row each: everything else about an option is derived.

A row says what the option is (its default and its check), what it switches on in
the flat buffers (``flag``: the ``_layout.FLAGS`` entry whose rows and kernel bit it
enables when its value is truthy), how ``fastlstm train`` spells it (``cli``), which
group ``fastlstm bench --variants`` times it in with which value (``bench``), and
whether ONNX's LSTM operator and Keras' LSTM can express a non-default value.

Read from here: ``LSTM.OPTIONS`` and ``_validate.layer_config``; the layout flags and
the kernels' option bits of a model (``flags``); the CLI's variant flags; the bench's
and the asv suite's variant list (``bench_variants``); the interop refusals
(``inexpressible``); the reference's variants. A new variant is a row here, its
layout rows, its kernel code and its tests.
"""
import collections

import numpy as np

from . import _layout
from . import _validate as check

__all__ = ["Option", "OPTIONS", "DEFAULTS", "VARIANTS", "layer_config", "flags", "param_flags",
           "workspace_flags", "inexpressible", "bench_variants", "spelling"]

Option = collections.namedtuple(
    "Option", "name default check flag variant cli help bench onnx keras")


def _probability(name, value):
    return check.real(name, value, lo=0.0, hi=1.0, hi_open=True)


def _clip(name, value):
    return None if value is None else check.real(name, value, lo=0.0, lo_open=True)


def _recompute(name, value):
    """None, 'sqrt' or a number of steps >= 1; anything else is a ValueError (a value of
    the wrong kind included: the option takes one of three forms, not one type)."""
    if value is None or (isinstance(value, str) and value == "sqrt"):
        return value
    try:
        if isinstance(value, str):
            raise TypeError
        return check.positive_int(name, value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None (keep every step), a number of steps >= 1 "
                         f"or 'sqrt', got {value!r}") from None


def _row(name, default, chk, flag=None, variant=False, cli=None, help=None, bench=None,
         onnx=True, keras=True):
    return Option(name, default, chk, flag, variant, cli, help, bench, onnx, keras)


#: ``cli`` is (flag, kind): kind "switch" (store True) or "probability" (a float in [0, 1)).
#: ``bench`` is (group, value): the group of ``fastlstm bench --variants`` it is timed in.
OPTIONS = (
    _row("num_layers", 1, check.positive_int),
    _row("bias", True, check.boolean, flag="bias"),
    _row("batch_first", False, check.boolean),
    _row("dropout", 0.0, _probability),
    _row("bidirectional", False, check.boolean),
    _row("proj_size", 0, check.nonnegative_int, flag="proj", onnx=False, keras=False),
    _row("forget_bias", 0.0, check.real),
    _row("cell_clip", None, _clip, onnx=False, keras=False),   # ONNX's clip bounds the gates
    # how the backward gets its activations: the maths, and so an export, is the same
    _row("recompute", None, _recompute, flag="recompute"),
    _row("peephole", False, check.boolean, flag="peephole", variant=True,
         cli=("--peephole", "switch"), help="peephole connections from the cell to the gates",
         bench=("peephole", True), keras=False),
    _row("layer_norm", False, check.boolean, flag="layer_norm", variant=True,
         cli=("--layer-norm", "switch"),
         help="layer normalisation of the gates' inputs and of the cell",
         bench=("layer_norm", True), onnx=False, keras=False),
    # zoneout's evaluation-mode expectation mixes the previous state in: no operator has it
    _row("zoneout", 0.0, _probability, flag="zoneout", variant=True,
         cli=("--zoneout", "probability"),
         help="zoneout of the hidden state: each unit keeps its value with probability P "
              "in training", bench=("zoneout", 0.1), onnx=False, keras=False),
    _row("zoneout_cell", 0.0, _probability, flag="zoneout", variant=True,
         cli=("--zoneout-cell", "probability"), help="zoneout of the cell state",
         bench=("zoneout", 0.1), onnx=False, keras=False),
    # exported as its weights: in evaluation recurrent dropout is the identity
    _row("recurrent_dropout", 0.0, _probability, flag="rdrop", variant=True,
         cli=("--recurrent-dropout", "probability"),
         help="dropout on h_{t-1} before W_hh, one mask per sequence",
         bench=("recurrent_dropout", 0.25)),
)

#: name -> default
DEFAULTS = {o.name: o.default for o in OPTIONS}
#: the cell variants (the reference's options, the CLI's variant flags), with their defaults
VARIANTS = {o.name: o.default for o in OPTIONS if o.variant}

assert {o.flag for o in OPTIONS if o.flag} == set(_layout.FLAGS), "a layout flag has no option"


def layer_config(input_size, hidden_size, dtype=np.float32, seed=None, threads=None,
                 **options):
    """An LSTM layer's constructor arguments, validated, as a dict: one set of checks
    for every backend (fastlstm.LSTM, reference.ReferenceLSTM)."""
    for k in options:
        if k not in DEFAULTS:
            raise TypeError(f"unexpected keyword argument {k!r}; the options are "
                            f"{', '.join(DEFAULTS)}")
    c = dict(input_size=check.positive_int("input_size", input_size),
             hidden_size=check.positive_int("hidden_size", hidden_size))
    c.update((o.name, o.check(o.name, options.get(o.name, o.default))) for o in OPTIONS)
    if c["proj_size"] >= c["hidden_size"]:
        raise ValueError(f"proj_size must be smaller than hidden_size={c['hidden_size']}, "
                         f"got {c['proj_size']}")
    if c["forget_bias"] != 0 and not c["bias"]:
        raise ValueError(f"forget_bias={c['forget_bias']} needs bias=True")
    c["dtype"] = check.dtype("dtype", dtype)
    c["seed"] = check.seed("seed", seed)
    c["threads"] = None if threads is None else check.positive_int("threads", threads)
    return c


def flags(config):
    """{layout flag: on} of a validated config: a flag is on when any option that
    enables it is truthy (``zoneout`` by ``zoneout`` or ``zoneout_cell``)."""
    on = dict.fromkeys(_layout.FLAGS, False)
    for o in OPTIONS:
        if o.flag and config[o.name]:
            on[o.flag] = True
    return on


def param_flags(config):
    """The parameter table's flags of a config, in ``_layout.PARAM_FLAGS`` order."""
    f = flags(config)
    return tuple(f[k] for k in _layout.PARAM_FLAGS)


def workspace_flags(config):
    """The workspace table's flags of a config, in ``_layout.WORKSPACE_FLAGS`` order."""
    f = flags(config)
    return tuple(f[k] for k in _layout.WORKSPACE_FLAGS)


def spelling(flag):
    """How a user turns a layout flag on: 'peephole=True', 'proj_size > 0'."""
    o = next(o for o in OPTIONS if o.flag == flag)
    return f"{o.name}=True" if isinstance(o.default, bool) else f"{o.name} > 0"


def inexpressible(target):
    """The options `target` ("onnx" or "keras") cannot express with a non-default value."""
    return tuple(o.name for o in OPTIONS if not getattr(o, target))


def bench_variants():
    """{group: LSTM options} that ``fastlstm bench --variants`` times, "plain" first."""
    out = {"plain": {}}
    for o in OPTIONS:
        if o.bench:
            group, value = o.bench
            out.setdefault(group, {})[o.name] = value
    return out
