"""Using the cores: a layer's batch split into parts, one thread each, or the two
directions of a bidirectional layer at once.

A batch's sequences are independent, so parts of it run the whole recurrence
with no synchronisation per step; each part has its own workspace and the weight
gradients are summed once at the end. Measured on 2 cores (float32 fwd+bwd) by a
probe before this was built: small 2.92 -> 2.12 ms, long 24.4 -> 10.9 ms, medium
114.9 -> 110.4 ms. Each thread runs BLAS single-threaded meanwhile, so the
machine is never oversubscribed.

On this kind of machine (2 cores) the two recurrences, each on one core with a
single-threaded BLAS, beat running them one after the other with BLAS on both
cores: measured at medium size (B=64, T=100, I=128, H=256, float32), fwd+bwd of
one bidirectional layer took 213 ms against 296 ms. BLAS calls from other threads
during such a call also run single-threaded (threadpoolctl changes a process-wide
setting).
"""
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from ._servers import _Posted, _uninterrupted, pinned_servers

_lock = threading.Lock()


class _State:
    """What this process's threading has set up, made when first needed (under _lock)
    and forgotten in a forked child."""

    def __init__(self):
        self.controller = None      # threadpoolctl's controller
        self.blas = []              # its BLAS libraries
        self.pool = None            # the thread pool of run_parts and run_pair
        self.saved = None           # BLAS's thread counts while fastlstm holds them at 1
        self.limit = None           # ... and the fewest of them (blas_limit meanwhile)


_state = _State()


def _forget_in_child():
    """A forked child inherits the pool object but not its worker thread: a task
    submitted there would wait forever. Start afresh (a new lock too: the parent's
    may have been held by another thread at the fork), and give BLAS back the thread
    count that a call running in another thread of the parent had lowered."""
    global _lock, _state
    _lock = threading.Lock()
    if _state.saved is not None:
        for lib, n in zip(_state.blas, _state.saved):
            lib.set_num_threads(n)
    _state = _State()
    _inside.clear()


os.register_at_fork(after_in_child=_forget_in_child)


#: multiply-adds of one fwd or bwd (T*B*4H*(I+P) over the layers) below which a
#: split does not pay for handing work to another thread (tens of microseconds)
SPLIT_WORK = 2_000_000


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _controller():
    with _lock:
        if _state.controller is None:
            # scipy's OpenBLAS, which the kernels' np.dot calls, loads with the first
            # kernel (compiled lazily, see _compile), which may come after this: loaded
            # first so that the controller sees it. Unseen, it kept its threads inside
            # the split parts and spinning after them: a large float32 forward after a
            # backward took 250 ms instead of 200.
            import scipy.linalg.cython_blas  # noqa: F401
            from threadpoolctl import ThreadpoolController
            controller = ThreadpoolController()
            _state.blas = controller.select(user_api="blas").lib_controllers
            _state.pool = ThreadPoolExecutor(max_workers=max(usable_cores() - 1, 1),
                                             thread_name_prefix="fastlstm")
            _state.controller = controller
    return _state.controller, _state.pool


def blas_limit():
    """The fewest threads any loaded BLAS may use (threadpoolctl's limit, or its
    default): a user's ``threadpool_limits(1)`` keeps fastlstm on one core too.
    While fastlstm itself holds BLAS at one thread, the limit from before."""
    _controller()
    with _lock:
        if _inside:
            return _state.limit
        _restore_blas()
        if _state.saved is not None:    # not restored from this thread (see _restore_blas)
            return min(_state.saved, default=usable_cores())
        return min((lib.num_threads for lib in _state.blas), default=usable_cores())


def _restore_blas():
    """Give BLAS back the thread counts saved when the first call lowered them. Under
    _lock, with no call inside. "saved" goes only once every library has its count
    back: a restore that a KeyboardInterrupt cut short is finished by the next call
    here, and a call that enters meanwhile keeps the saved counts, not the 1s."""
    saved = _state.saved
    if saved is not None:
        for lib, n in zip(_state.blas, saved):
            lib.set_num_threads(n)
        # OpenBLAS takes a higher count from the main thread only (set to 2 from another
        # thread, it stays at 1): then the counts stay saved, the limit is theirs, and
        # the next call in the main thread restores them
        if threading.current_thread() is threading.main_thread() or all(
                lib.num_threads >= n for lib, n in zip(_state.blas, saved)):
            _state.saved = None


#: tokens of the calls inside a single-threaded BLAS section. A call discards its token
#: as the first statement of a ``finally`` (set.discard, C: Ctrl-C cannot come between the
#: section's end and it), so the count is always right; the restore after it may be cut
#: short, and is then finished by the next call (which keeps the saved counts meanwhile).
_inside = set()


def enter_single_threaded_blas(token):
    """BLAS at one thread until ``leave_single_threaded_blas`` (counted over calls in
    all threads: with two models in two threads, the first to leave must not restore
    the limit under the other). Call it inside the ``try`` whose ``finally`` first runs
    ``_inside.discard(token)``, then leave_single_threaded_blas()."""
    _controller()
    with _lock:
        if not _inside:
            libs = _state.blas
            if _state.saved is None:       # else: an interrupted restore's counts
                _state.saved = [lib.num_threads for lib in libs]
            _state.limit = min(_state.saved, default=usable_cores())
            for lib in libs:
                lib.set_num_threads(1)
        _inside.add(token)


def leave_single_threaded_blas():
    """Restore BLAS's counts when no call is inside any more."""
    with _lock:
        if not _inside:
            _restore_blas()


class _SingleThreadedBlas:
    """enter/leave_single_threaded_blas as a context, for the sections that run inside
    deferred_interrupt (Ctrl-C held back, so that nothing cuts them short)."""

    def __enter__(self):
        enter_single_threaded_blas(self)

    def __exit__(self, *exc):
        _inside.discard(self)
        leave_single_threaded_blas()


def batch_parts(threads, B, work):
    """How many parts to split a batch of B into: one per thread (`threads`, or the
    usable cores under the BLAS limit), when the work is worth it. The limit is read
    only then: it costs microseconds, which a small call cannot spare."""
    if B < 2 or work < SPLIT_WORK:
        return 1
    return max(min(threads or min(usable_cores(), blas_limit()), B), 1)


#: the column split (see _columns) runs where B * COLUMN_UNITS <= H, from H =
#: COLUMN_MIN_H: measured against the batch split and one thread, evaluation forward,
#: T = 100, float32 (each setting in its own process): H = 128 lost at every B; H = 256
#: won at B = 1, 2 (1.06 against 2.24 ms, 1.91 against 2.48) and tied at 4 (3.04,
#: 3.16); H = 512 won to B = 8 (5.3 against 21.0 ms at B = 1, 20.9 against 27.4 at 8)
#: and tied at 16 (40.4, 40.4)
COLUMN_UNITS, COLUMN_MIN_H = 64, 256


def column_parts(threads, B, H):
    """How many threads to split the hidden units of an evaluation forward over (see
    _columns); 1: not worth it (or one thread allowed). Never more than the usable cores:
    the threads wait for each other every step, spinning, so each needs a core of its own."""
    if H < COLUMN_MIN_H or B * COLUMN_UNITS > H:
        return 1
    return max(min(threads or blas_limit(), usable_cores(), H // 16), 1)


#: a training forward and backward split by hidden units (see _columns_train) where
#: W_hh's bytes per sequence of the batch reach this. Measured against the batch split,
#: fwd+bwd, 2 threads, T = 25-50, median of 3 alternated rounds (batch / column): at 64
#: KiB it lost or tied (H = 128, B = 4: 0.99; H = 256, B = 16: 0.97; float64 H = 128, B
#: = 8: 0.96; H = 512, B = 64: 1.01); at 128 KiB it tied or won (H = 256, B = 8: 1.11;
#: H = 512, B = 32: 1.01; float64 H = 256, B = 16: 1.07), and more above (H = 512, B =
#: 8: 1.33; H = 1024, B = 4: 1.45; H = 2048, B = 16: 1.63, B = 128: 1.15). Two layers
#: alike: H = 256, B = 4: 1.30; H = 512, B = 8: 1.30; H = 1024, B = 16: 1.21 (B = 1, H =
#: 512: 0.98, a tie)
TRAIN_COLUMN_BYTES = 128 << 10


def train_column_parts(threads, B, H, itemsize):
    """How many threads to split the hidden units of a training forward and backward
    over (see _columns_train); 1: the batch split instead (or one thread allowed)."""
    if 4 * H * H * itemsize < B * TRAIN_COLUMN_BYTES:
        return 1
    return max(min(threads or blas_limit(), usable_cores(), H // 16), 1)


def single_threaded(parts, work):
    """Whether each kernel call of a fwd or bwd split into `parts` (of `work`
    multiply-adds in all) has one thread, BLAS included: then its products may run
    packed (_gemm, single-threaded). Unsplit, a large call's BLAS may use several
    threads; a small call's products are too small for BLAS to thread."""
    return parts > 1 or work < SPLIT_WORK or blas_limit() <= 1


class deferred_interrupt:
    """Ctrl-C held back while a call hands work to other threads, its KeyboardInterrupt
    raised when the call is over. ThreadPoolExecutor's locks and futures are Python code
    that a KeyboardInterrupt can cut between taking a lock and giving it back (a pool
    that hung for good, seen under interrupts at random points), and _SingleThreadedBlas's
    Python __exit__ likewise. Only in the main thread (where Python
    raises KeyboardInterrupt) and only over Python's own SIGINT handler, not a user's.
    Not on the split plans' path (_SplitPlan._run), where it made a small fwd+bwd
    about 5 % slower."""

    def __enter__(self):
        self.pending = self.held = False
        if threading.current_thread() is threading.main_thread():
            # one call, not getsignal and signal: each costs microseconds
            previous = signal.signal(signal.SIGINT, self._hold)
            self.held = previous is signal.default_int_handler
            if not self.held:                   # a handler of the user's: theirs it stays
                signal.signal(signal.SIGINT, previous)
        return self

    def _hold(self, signum, frame):
        self.pending = True

    def __exit__(self, exc_type, *_):
        if self.held:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.pending and exc_type is None:
                raise KeyboardInterrupt


def _submitter(n):
    """How this thread hands n calls to other threads: to its pinned servers (see
    _Posted), else to the pool."""
    servers = pinned_servers(n)
    if servers is not None:
        return [partial(_Posted, server) for server in servers]
    _, pool = _controller()
    return [pool.submit] * n


def run_parts(calls):
    """Call calls[0]() here and the others on the pool (or the pinned servers), BLAS
    single-threaded; returns their results in order."""
    submit = _submitter(len(calls) - 1)
    with deferred_interrupt(), _SingleThreadedBlas():
        futures = [s(call) for s, call in zip(submit, calls[1:])]
        try:
            first = calls[0]()
        finally:
            rest = [_uninterrupted(f.result) for f in futures]
    return [first, *rest]


def parallel_worthwhile(work, threads=None):
    """Whether `work` (multiply-adds of one direction's fwd or bwd) is large enough
    for two threads to pay for their start-up, and two are allowed: the same count
    as the batch split (`threads`, or the usable cores under the BLAS limit)."""
    if work < 50_000_000:
        return False
    return (threads or min(usable_cores(), blas_limit())) > 1


def run_pair(first, second):
    """Call first() here and second() on a worker thread, BLAS single-threaded."""
    submit, = _submitter(1)
    with deferred_interrupt(), _SingleThreadedBlas():
        future = submit(second)
        try:
            first()
        finally:
            _uninterrupted(future.result)
