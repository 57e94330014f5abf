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
import itertools
import os
import signal
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from ._spin import DONE, JOB, SEQ, post, spin_for_command, spin_until_at_least

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
        self.spins = None           # spin-reads of a server before it sleeps
        self.servers = []           # the split plans' spinning servers
        self.servers_owner = None   # the thread that took them; None: free
        self.servers_pinned = False  # their owner keeps them past release_servers (lend)


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


def _uninterrupted(wait):
    """wait() to the end, through KeyboardInterrupts, re-raising the first after: a
    part still running in a model's buffers must not outlive the call that owns them
    (its guard released, a next call could run beside it)."""
    interrupted = False
    while True:
        try:
            result = wait()
            break
        except KeyboardInterrupt:
            # not kept: an exception held in a local of its own traceback's frame makes a
            # cycle, which would keep the frames (and what they hold) until gc runs
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
    return result


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


class _Posted:
    """call() run as a command of a server, as a future: for a caller that holds the
    servers pinned (``pin_servers``), whose threads a lender has put on cores of their
    own (see fastlstm._openmp), where the pool's threads would contend for them."""

    def __init__(self, server, call):
        self.server, self.call = server, call
        self.value = self.error = None
        self.number = new_job()
        self.seq = server.post(self.number, self._run, 1)

    def _run(self, cell, spins):
        """A job (see Server): serves its one command, and nothing when the command
        pending is not its own (a lent thread enters the job it ran last again)."""
        seq = cell[SEQ]
        if seq != self.seq or cell[DONE] >= seq or cell[JOB] != self.number:
            return
        try:
            self.value = self.call()
        except BaseException as e:      # noqa: BLE001 - raised by result()
            self.error = e
        cell[DONE] = seq

    def result(self):
        self.server.wait(self.seq)
        if self.error is not None:
            raise self.error
        return self.value


def _submitter(n):
    """How this thread hands n calls to other threads: to its pinned servers (see
    _Posted), else to the pool."""
    with _lock:
        servers = _state.servers
        if (_state.servers_pinned and _state.servers_owner == threading.get_ident()
                and len(servers) >= n):
            return [partial(_Posted, server) for server in servers[:n]]
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


#: how long a server's worker spins for the next command before it sleeps: longer than the
#: Python between a forward and its backward, or between two training steps, at small sizes
SPIN_SECONDS = 0.002


def _spins_per_second():
    cell = np.zeros(8, np.int64)
    spin_until_at_least(cell, 0, 1, 1000)           # compiled (or loaded) first
    t0 = time.perf_counter()
    spin_until_at_least(cell, 0, 1, 1_000_000)
    return 1_000_000 / max(time.perf_counter() - t0, 1e-6)


def _dead():
    return None


class Server:
    """A worker thread that runs a job's serving loop in compiled code (e.g.
    _spin.serve_rows): it waits for commands by spinning on `cell` without the GIL,
    for SPIN_SECONDS after each, and only then sleeps. A command posted while it spins
    starts within microseconds instead of the 50-70 us of a wake-up (see _spin). One
    caller at a time: ``take_servers``.

    A job is a number (``new_job``) and a callable(cell, spins) that serves that job's
    commands and returns at one for another job or after an idle spell; each command
    names its job, so a loop still spinning for the previous job leaves the command to
    the loop of the job it names, which this thread enters next. An idle server holds
    no job (nor the buffers it refers to), and it is woken only when it sleeps, so it
    makes no extra pass through a loop after a burst. Its state changes under a
    C-level lock (no KeyboardInterrupt can split them), and ``wait`` wakes a server
    whose wake-up an interrupted ``post`` may have missed.

    Why not one Numba ``parallel=True`` entry with a prange over the parts: as fast
    (fwd+bwd, float32, 0.97x, 1.00x, 1.00x of this at small, long, medium), but of the
    threading layers Numba has here without TBB, ``omp`` kills a forked child that
    splits a batch and ``workqueue`` aborts the process when two models split at once
    in two threads; both are things a user does and the tests do."""

    def __init__(self, spins):
        self.cell = np.zeros(8, np.int64)
        self.spins = spins
        self._job = None
        self._serving = False
        self._hosted = False                # a lent thread serves instead (see host)
        self._kept = _dead                  # the job a lent thread ran last (weakly)
        self._mutex = threading.Lock()
        self._wake = threading.Lock()       # released: a command waits for a sleeping server
        self._wake.acquire()
        self.error = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fastlstm-server")
        self._thread.start()

    def alive(self):
        return self._thread.is_alive()

    def _pending(self):
        return self.cell[SEQ] > self.cell[DONE]

    def _loop(self):
        try:
            while True:
                with self._mutex:
                    if self._hosted:            # a lent thread serves: sleep until it ends
                        sleep = True
                    else:
                        sleep = not self._pending()
                        if sleep:
                            self._job, self._serving = None, False
                        else:                   # a wake-up posted for it: taken with it
                            self._wake.acquire(blocking=False)
                            job, self._serving = self._job, True
                if sleep:
                    self._wake.acquire()
                    continue
                if not self._parked(job):
                    job(self.cell, self.spins)
                # held by no local while it sleeps: a park taken here (a lender's region
                # ends with one) kept the job, and through it a plan's buffers, alive
                job = None
        except BaseException as e:      # noqa: BLE001 - handed to the caller by wait()
            self.error = e              # the thread ends: wait() raises, take_servers replaces it

    def _parked(self, job):
        """Whether the pending command is a park (see park; or no job holds it): then it
        is done here, with nothing to run."""
        if job is None or self.cell[JOB] == 0:
            self.cell[DONE] = self.cell[SEQ]
            return True
        return False

    def _kick(self):
        """Wake the thread if it sleeps with a command waiting. Under _mutex."""
        if not self._serving and self._pending() and self._wake.locked():
            self._wake.release()

    def post(self, number, job, cmd):
        """Post command `cmd` for job `number`, served by `job`; returns the number
        ``wait`` takes."""
        with self._mutex:
            self._job = job                 # before the command: a loop it ends reads it
            seq = post(self.cell, number, cmd)
            self._kick()
        return seq

    def park(self):
        """Send the thread to sleep now rather than after its spell of spinning: for a
        caller whose next work runs on other threads that need the cores (torch's
        intra-op pool between fastlstm.torch's calls). Not waited for."""
        with self._mutex:
            self._job = None                # no loop serves job 0: the one running returns
            post(self.cell, 0, 0)
            self._kick()

    def host(self, stop):
        """Serve this server's commands on the calling thread, one lent by another pool
        (torch's OpenMP workers, see fastlstm._openmp), until stop[0] is set and nothing
        is pending; its own thread sleeps meanwhile. Returns at once when its own thread
        is serving (it goes on doing so), having set stop[1] to 2. Every loop it serves
        in counts itself in cell[ENTERED] as it starts, without the GIL (see _spin): the
        lender's sign that this thread no longer wants it. The lender ends it by
        setting stop[0] and posting a park command (job 0: it ends a job's loop still
        spinning; a park still pending when this returns waits for the server's own
        thread, like any command).

        The job it ran last is entered again first (while its plan lives: a weak
        reference), so that a command for it starts without this thread taking the GIL
        from the caller, which holds it while it posts (a wake-up of 50-100 us)."""
        with self._mutex:
            if self._serving:
                stop[1] = 2
                return
            self._hosted = self._serving = True
            kept = self._kept()
        try:
            if kept is not None and not stop[0]:
                kept(self.cell, self.spins)
            del kept
            while True:
                pending = spin_for_command(self.cell, stop, self.spins)
                if not pending:
                    if stop[0]:
                        return
                    continue
                with self._mutex:
                    job = self._job
                if not self._parked(job):
                    self._kept = weakref.ref(job)
                    job(self.cell, self.spins)
                job = None
        except BaseException as e:      # noqa: BLE001 - handed to the caller by wait()
            self.error = e
        finally:
            with self._mutex:
                self._hosted = self._serving = False
                if not self._pending():
                    self._job = None            # an idle server holds no job
                self._kick()

    def posted(self):
        """The number of the last command posted."""
        return int(self.cell[SEQ])

    def wait(self, seq):
        """Until command `seq` is done, spinning without the GIL (sleeping between
        spells), through KeyboardInterrupts (see _uninterrupted). A failure in the
        server's job is raised here, as a RuntimeError from it, and a server thread
        that has ended is never waited on."""
        with self._mutex:
            self._kick()
        if spin_until_at_least(self.cell, DONE, seq, self.spins) >= seq:
            return          # the common case, without building the loop below (no objects)

        def until_done():
            while spin_until_at_least(self.cell, DONE, seq, self.spins) < seq:
                if self.error is not None or not self._thread.is_alive():
                    raise RuntimeError("a fastlstm server thread failed while running a "
                                       "split call's part") from self.error
                time.sleep(1e-4)
        _uninterrupted(until_done)


_job_numbers = itertools.count(1)


def new_job():
    """A number for a Server job, unique in this process."""
    return next(_job_numbers)


def take_servers(n):
    """n servers for this thread's exclusive use, or None when another thread has them;
    give them back with ``release_servers``."""
    with _lock:
        if _state.spins is None:
            _state.spins = int(_spins_per_second() * SPIN_SECONDS)
        me = threading.get_ident()
        if _state.servers_owner not in (None, me):
            return None         # another thread's (this thread's: a call cut short kept them)
        servers = _state.servers
        for sv in servers:
            if sv.error is not None:            # a failed one is replaced
                servers[:] = [sv for sv in servers if sv.error is None]
                break
        while len(servers) < n:
            servers.append(Server(_state.spins))
        _state.servers_owner = me           # one store: taken, or not
        return servers[:n]


def pin_servers():
    """Take the servers for this thread until ``unpin_servers``, through the calls that
    take and release them meanwhile (a lender's region, which posts to them when it
    ends: see fastlstm._openmp). False when another thread has them."""
    with _lock:
        me = threading.get_ident()
        if _state.servers_owner not in (None, me):
            return False
        _state.servers_owner, _state.servers_pinned = me, True
        return True


def unpin_servers():
    """End ``pin_servers``: the servers are free again."""
    with _lock:
        if _state.servers_owner == threading.get_ident():
            _state.servers_owner, _state.servers_pinned = None, False


def _server(k):
    with _lock:
        if _state.spins is None:
            _state.spins = int(_spins_per_second() * SPIN_SECONDS)
        servers = _state.servers
        while len(servers) <= k:
            servers.append(Server(_state.spins))
        return servers[k]


def server_cell(k):
    """The k-th server's cell (made when there is none yet), where its commands are
    posted (see _spin.post)."""
    return _server(k).cell


def host_server(k, stop):
    """Serve the k-th server's commands on the calling thread until stop[0] is set (see
    ``Server.host``)."""
    _server(k).host(stop)


def park_servers():
    """``Server.park`` every server no thread holds."""
    with _lock:
        if _state.servers_owner is None:
            for server in _state.servers:
                server.park()


def release_servers():
    """Give back the servers this thread took (nothing when it holds none, so that a
    ``finally`` may call it whether or not ``take_servers`` got them)."""
    with _lock:
        if _state.servers_owner == threading.get_ident() and not _state.servers_pinned:
            _state.servers_owner = None
