"""Atomic loads and stores on an int64 array and a spin-wait, for handing work to a thread
that waits in compiled code (see _servers.Server) instead of on a lock; and that
thread's serving loop, ``serve_rows``.

On these machines waking a thread that sleeps on a lock took 50-70 us, and every hand-off
between two Python threads pays it again for the GIL; a part of a split batch at small
size runs in about 500 us. A thread that spins in nopython code sees a store in about a
microsecond and needs no GIL to start its work."""
from numba import njit, types

from . import _kernels
from ._compile import entry
from ._config import JIT, follow
from ._kernels import (
    NO_DX,
    _backward_rows_out,
    _forward_rows_out,
    layer_backward,
    layer_forward,
    workspace_of,
)
from ._numba_ext import intrinsic, make_array

# serve_rows carries the entries' code in its cache entry
follow(__file__, *_kernels.SOURCES)

__all__ = ["load_acquire", "store_release", "spin_while_equal", "spin_until_at_least",
           "spin_for_command", "entered", "post",
           "SEQ", "CMD", "JOB", "DONE", "ENTERED", "FORWARD", "BACKWARD", "BACKWARD_NO_DX",
           "serve_rows"]


@intrinsic
def load_acquire(typingctx, arr, idx):
    """arr[idx], read atomically with acquire ordering (a spinning loop may not keep it in
    a register, and reads after it see what the writer stored before its release)."""
    def codegen(context, builder, sig, args):
        a = make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)
    return types.int64(arr, types.int64), codegen


@intrinsic
def store_release(typingctx, arr, idx, value):
    """arr[idx] = value, atomically with release ordering."""
    def codegen(context, builder, sig, args):
        a = make_array(sig.args[0])(context, builder, args[0])
        builder.store_atomic(args[2], builder.gep(a.data, [args[1]]), "release", 8)
        return context.get_dummy_value()
    return types.void(arr, types.int64, types.int64), codegen


@njit(inline="always", **JIT)
def spin_while_equal(cell, idx, old, spins):
    """Spin while cell[idx] == old, at most `spins` reads; returns the last value read."""
    v = load_acquire(cell, idx)
    n = 0
    while v == old and n < spins:
        v = load_acquire(cell, idx)
        n += 1
    return v


@njit(**JIT)
def spin_until_at_least(cell, idx, target, spins):
    """Spin (without the GIL) until cell[idx] >= target, at most `spins` reads; returns
    the last value read."""
    v = load_acquire(cell, idx)
    n = 0
    while v < target and n < spins:
        v = load_acquire(cell, idx)
        n += 1
    return v


@njit(**JIT)
def spin_for_command(cell, stop, spins):
    """Spin (without the GIL) until a command is pending in cell (SEQ > DONE) or stop[0]
    is set, at most `spins` reads; returns whether a command is pending. Counts itself
    in cell[ENTERED] first (see entered)."""
    entered(cell)
    n = 0
    while n < spins:
        if load_acquire(cell, SEQ) > load_acquire(cell, DONE):
            return True
        if load_acquire(stop, 0) != 0:
            break
        n += 1
    return load_acquire(cell, SEQ) > load_acquire(cell, DONE)


#: the slots of a Server's cell: the number of commands posted, the last one's code and
#: the job (serving loop) it is for, the number done (each written by one side only), and
#: the number of serving loops entered (see entered)
SEQ, CMD, JOB, DONE, ENTERED = 0, 1, 2, 3, 4


@njit(inline="always", **JIT)
def entered(cell):
    """Count a serving loop's start in cell[ENTERED]. Stored from compiled code, so after
    the thread let go of the GIL: what a lender waits for before it takes the GIL (see
    fastlstm._openmp). One thread serves a cell at a time: a plain increment."""
    store_release(cell, ENTERED, load_acquire(cell, ENTERED) + 1)


#: command codes (what a serving loop does with them is its own)
#: BACKWARD_NO_DX: BACKWARD with the NO_DX option (no one wants dx)
FORWARD, BACKWARD, BACKWARD_NO_DX = 1, 2, 3


@njit(**JIT)
def post(cell, job, cmd):
    """Post command `cmd` for job number `job`: its code and job, then (released after
    them) the count. Returns the command's sequence number."""
    seq = cell[SEQ] + 1
    cell[CMD] = cmd
    cell[JOB] = job
    store_release(cell, SEQ, seq)
    return seq


def _serve_sigs():
    out = []
    for ft in (types.float32, types.float64):
        flat, io = types.Array(ft, 1, "C"), types.Array(ft, 3, "C")
        out.append(types.void(types.Array(types.int64, 1, "C"), types.int64, types.int64,
                              *[flat] * 3,
                              *[io] * 6, types.int64, types.Array(types.int64, 1, "C"), ft,
                              *[types.int64] * 6))
    return out


@entry(_serve_sigs(), needs=(layer_forward, layer_backward))
def serve_rows(cell, spins, me, p, g, ws, y, h_n, c_n, dx, dh0, dc0, b0, lengths, clip,
               T, B, I, H, P, opts):
    """A worker thread's side of a split plan (see _servers.Server): runs the commands
    posted in cell for job `me` on rows [b0, b0 + B); returns, leaving it, at a command
    for another job, or when none came in `spins` reads. FORWARD: ``layer_forward`` on
    x already in the workspace, its rows of y, h_n, c_n written as ``rows_forward``
    does. BACKWARD: g zeroed, then ``layer_backward`` on dy already in the workspace,
    and its rows of dx, dh0, dc0 written."""
    entered(cell)
    v = workspace_of(ws, T, B, I, H, P, opts)
    done = load_acquire(cell, DONE)
    while True:
        seq = spin_while_equal(cell, SEQ, done, spins)
        if seq == done or load_acquire(cell, JOB) != me:
            return
        cmd = load_acquire(cell, CMD)
        if cmd == FORWARD:
            layer_forward(p, ws, lengths, clip, T, B, I, H, P, opts)
            _forward_rows_out(v, y, h_n, c_n, b0)
        elif cmd == BACKWARD or cmd == BACKWARD_NO_DX:
            bits = opts | NO_DX if cmd == BACKWARD_NO_DX else opts
            g[:] = 0
            layer_backward(p, g, ws, lengths, clip, T, B, I, H, P, bits)
            _backward_rows_out(v, dx, dh0, dc0, b0, bits)
        done = seq
        store_release(cell, DONE, seq)
