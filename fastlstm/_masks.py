"""The random masks of one forward: dropout on the outputs of every layer but the last,
then zoneout's and recurrent dropout's. Each is drawn whole for the batch, in this
order, from the model's generator, so that the masks do not depend on how the batch is
split (the reference, reference.py, draws the same numbers in the same order). They
live in the model's scratch buffers (``_shared.Buffers``) and are valid until its next
call."""
import numpy as np

__all__ = ["dropout_masks", "variant_masks"]


def dropout_masks(buf, rng, p, L, T, B, width):
    """[per layer: the (T, B, width) mask on its output (0, or 1/(1-p)), or None]: one for
    each layer but the last when p > 0, else none."""
    masks = [None] * L
    if p > 0 and L > 1:
        dt = buf.dtype
        keep, p = dt.type(1.0 - p), dt.type(p)
        for k in range(L - 1):
            mask = masks[k] = buf.get(f"mask{k}", (T, B, width))
            rng.random(out=mask, dtype=dt)
            np.greater_equal(mask, p, out=mask)
            mask /= keep
    return masks


def variant_masks(buf, rng, wflags, training, zoneout, zoneout_cell, recurrent_dropout,
                  LD, T, B, H, P):
    """{workspace name: (L*D, ...) array} of zoneout's ("zh", "zc": 1 where a unit keeps
    its previous value) and recurrent dropout's ("rmask") masks, for the variants the
    workspace flags ``wflags`` switch on; in evaluation, their expectations."""
    out = {}
    dt = buf.dtype
    if wflags[1]:
        for name, p, size in (("zh", zoneout, P), ("zc", zoneout_cell, H)):
            a = out[name] = buf.get(name, (LD, T, B, size))
            if training and p > 0:
                rng.random(out=a, dtype=dt)
                np.less(a, dt.type(p), out=a)
            else:
                a.fill(0 if training else p)
    if wflags[2]:
        a = out["rmask"] = buf.get("rmask", (LD, B, P))
        if training:
            rng.random(out=a, dtype=dt)
            np.greater_equal(a, dt.type(recurrent_dropout), out=a)
            a /= dt.type(1.0 - recurrent_dropout)
        else:
            a.fill(1)
    return out
