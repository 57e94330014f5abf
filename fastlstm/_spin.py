"""Atomic loads and stores on an int64 array and a spin-wait, for handing work to a thread
that waits in compiled code (see _threads.Server) instead of on a lock.

On these machines waking a thread that sleeps on a lock took 50-70 us, and every hand-off
between two Python threads pays it again for the GIL; a part of a split batch at small
size runs in about 500 us. A thread that spins in nopython code sees a store in about a
microsecond and needs no GIL to start its work."""
from numba import njit, types
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from ._config import JIT

__all__ = ["load_acquire", "store_release", "spin_while_equal", "spin_until_at_least", "post",
           "SEQ", "CMD", "JOB", "DONE", "FORWARD", "BACKWARD"]


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


@njit(["int64(int64[::1], int64, int64, int64)"], **JIT)
def spin_until_at_least(cell, idx, target, spins):
    """Spin (without the GIL) until cell[idx] >= target, at most `spins` reads; returns
    the last value read."""
    v = load_acquire(cell, idx)
    n = 0
    while v < target and n < spins:
        v = load_acquire(cell, idx)
        n += 1
    return v


#: the slots of a Server's cell: the number of commands posted, the last one's code and
#: the job (serving loop) it is for, the number done (each written by one side only)
SEQ, CMD, JOB, DONE = 0, 1, 2, 3
#: command codes (what a serving loop does with them is its own)
FORWARD, BACKWARD = 1, 2


@njit(["int64(int64[::1], int64, int64)"], **JIT)
def post(cell, job, cmd):
    """Post command `cmd` for job number `job`: its code and job, then (released after
    them) the count. Returns the command's sequence number."""
    seq = cell[SEQ] + 1
    cell[CMD] = cmd
    cell[JOB] = job
    store_release(cell, SEQ, seq)
    return seq
