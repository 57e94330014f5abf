"""The spinning servers of the split plans: worker threads that wait for commands in
compiled code (see _spin), one caller at a time (``take_servers``), lent to torch's
OpenMP pool by fastlstm._openmp; and ``_Posted``, a call run as one of their commands.
"""
import itertools
import os
import threading
import time
import weakref

import numpy as np

from ._spin import DONE, JOB, SEQ, post, spin_for_command, spin_until_at_least

__all__ = ["Server", "new_job", "take_servers", "release_servers", "pin_servers",
           "unpin_servers", "pinned_servers", "server_cell", "host_server", "park_servers"]

_lock = threading.Lock()


class _State:
    """The servers of this process (under _lock), forgotten in a forked child, which
    has none of their threads."""

    def __init__(self):
        self.spins = None           # spin-reads of a server before it sleeps
        self.servers = []
        self.servers_owner = None   # the thread that took them; None: free
        self.servers_pinned = False  # their owner keeps them past release_servers (lend)


_state = _State()


def _forget_in_child():
    global _lock, _state
    _lock = threading.Lock()
    _state = _State()


os.register_at_fork(after_in_child=_forget_in_child)


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
                if self._pending() and self.cell[JOB] == 0:
                    # the lender's park, still pending: done here, as the own thread's
                    # loop would do it later (the region then ends holding no job)
                    self.cell[DONE] = self.cell[SEQ]
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


def pinned_servers(n):
    """n servers that this thread holds pinned (see ``pin_servers``), or None."""
    with _lock:
        servers = _state.servers
        if (_state.servers_pinned and _state.servers_owner == threading.get_ident()
                and len(servers) >= n):
            return servers[:n]
    return None
