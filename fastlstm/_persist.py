"""What a layer saves and loads: its configuration, its parameters under torch's names,
and its dropout generator's state (for checkpoints). ``lstm.LSTM`` takes these methods
from ``Persist``."""
import re

import numpy as np

from . import _layout, _options
from . import _validate as check

__all__ = ["Persist"]


def _options_of(keys, lead):
    """'; <lead> peephole=True, ...' for the options the parameter names belong to."""
    when = {name: w for name, _, w in _layout.PARAMS}
    bases = [re.sub(r"_l\d+(_reverse)?$", "", k) for k in keys]
    opts = sorted({_options.spelling(when[b]) for b in bases if when.get(b)})
    return f"; {lead} {', '.join(opts)}" if opts else ""


class Persist:
    """``config``, ``state_dict``, ``load_state_dict`` and the generator's state, for a
    model with its options as attributes, ``params`` (name -> view), ``_layout`` ([(name,
    shape)]), ``dtype`` and ``_rng``."""

    #: the constructor's options after the two sizes, with their defaults (_options' table)
    OPTIONS = tuple(_options.DEFAULTS.items())

    def config(self):
        """The validated constructor arguments as plain Python values (JSON-ready):
        ``LSTM(**m.config())`` builds the same model."""
        return dict(input_size=self.input_size, hidden_size=self.hidden_size,
                    **{k: getattr(self, k) for k, _ in self.OPTIONS},
                    dtype=self.dtype.name, seed=self.seed)

    def __repr__(self):
        opts = [f"{self.input_size}", f"{self.hidden_size}"]
        opts += [f"{k}={getattr(self, k)!r}" for k, default in self.OPTIONS
                 if getattr(self, k) != default]
        return f"LSTM({', '.join(opts)}, dtype={self.dtype.name})"

    def get_rng_state(self):
        """The dropout generator's state (a dict, JSON-serialisable), for checkpoints."""
        return self._rng.bit_generator.state

    def set_rng_state(self, state):
        """Restore a state returned by ``get_rng_state``."""
        self._rng.bit_generator.state = state

    def state_dict(self):
        """Copies of the parameters, under torch's names and shapes."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict):
        """Load parameters saved by ``state_dict`` or converted from torch.

        Every key, type and shape is checked before anything is written; floating
        arrays of another dtype are cast to the model's.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = set(self.params)
        missing = sorted(expected - set(state_dict.keys()))
        unexpected = sorted(set(state_dict.keys()) - expected)
        if missing:
            raise KeyError(f"state_dict is missing {missing} (expected keys {sorted(expected)})"
                           + _options_of(missing, "this model has"))
        if unexpected:
            raise KeyError(f"state_dict has unexpected keys {unexpected} "
                           f"(expected keys {sorted(expected)})"
                           + _options_of(unexpected, "they belong to a model with"))
        for name, shape in self._layout:
            a = state_dict[name]
            check.float_array(f"state_dict[{name!r}]", a, self.dtype)
            check.shape(f"state_dict[{name!r}]", a, shape)
        for name, _ in self._layout:
            np.copyto(self.params[name], state_dict[name], casting="same_kind")
