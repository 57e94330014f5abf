"""torch's intra-op OpenMP pool lent to fastlstm's servers for the length of a call
(``lend``): imported by fastlstm.torch only (it imports torch)."""
import ctypes
import os
import threading

import numpy as np
import torch

from ._servers import host_server, park_servers, pin_servers, server_cell, unpin_servers
from ._spin import ENTERED

__all__ = ["lend"]

#: per torch OpenMP worker: its Python thread state is kept (see _OpenMP._worker)
_lent_thread = threading.local()


class _OpenMP:
    """torch's intra-op pool (libgomp), lent to fastlstm for the length of a call.

    After each parallel op torch's OpenMP workers spin for a few milliseconds on the
    other cores (measured here: 4.5 ms of CPU after one ``fill_``), exactly where a
    split call's servers (_servers.Server) run its other parts: in a torch training
    loop at small size (float32) a step took 4.9 ms against 2.4 with torch held at one
    thread. So a call that splits runs inside a parallel region of torch's own pool:
    its thread 0 is the caller, which runs the call; its thread k serves the k-th
    server's commands (``_servers.host_server``) while that server's own thread sleeps.

    The region's body is compiled (a cfunc, made once per process) so that no two
    threads want the GIL at once, which costs the loser a wake-up (50-70 us here):
    thread 0 waits without it until the others have let it go (they took it first to
    start serving), ends their serving by posting a park command from compiled code
    after its own Python is done, and returns only when they are out of Python. Where
    torch does not run on libgomp, or the caller is already inside a parallel region,
    the call runs as it is."""

    _FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    #: a row of the control table per thread: [stop, 2 when it does not serve, out of
    #: Python, its server's cell address, the count of serving loops entered
    #: (cell[ENTERED]) that says it has let go of the GIL]
    STOP, READY, DONE, CELL, TARGET = 0, 1, 2, 3, 4

    def __init__(self):
        self.lib = None
        if "OpenMP" not in torch.__config__.parallel_info():
            return
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
        except OSError:
            return
        torch_dir = os.path.dirname(torch.__file__)
        paths = sorted(paths, key=lambda p: not p.startswith(torch_dir))  # torch's own first
        if not paths:
            return
        lib = ctypes.CDLL(paths[0])
        lib.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                      ctypes.c_uint]
        lib.GOMP_parallel.restype = None
        for name in ("omp_get_thread_num", "omp_get_num_threads", "omp_in_parallel"):
            getattr(lib, name).argtypes, getattr(lib, name).restype = [], ctypes.c_int
        self.runs = {}
        self.master = self._FN(self._master)    # kept: the cfunc calls them
        self.worker = self._FN(self._worker)
        self.body = _region_body(lib.omp_get_thread_num, lib.omp_get_num_threads,
                                 self.master, self.worker)
        self.lib = lib

    def _master(self, data):
        run = self.runs[data]
        try:
            run["out"] = run["work"]()
        except BaseException as e:     # noqa: BLE001 - raised again by run()
            run["error"] = e

    def _worker(self, data):
        if not getattr(_lent_thread, "kept", False):
            # a thread state made once and kept (the callback's own would be made and
            # torn down on every call: about 20 us each way)
            ctypes.pythonapi.PyGILState_Ensure()
            _lent_thread.kept = True
        k = self.lib.omp_get_thread_num()
        row = self.runs[data]["ctl"][k]
        cell = server_cell(k - 1)
        row[self.TARGET] = cell[ENTERED] + 1
        row[self.CELL] = cell.ctypes.data
        host_server(k - 1, row)

    def run(self, n, work):
        """work() on this thread, torch's workers serving n - 1 servers meanwhile."""
        if self.lib is None or n < 2 or self.lib.omp_in_parallel() or not pin_servers():
            try:
                return work()
            finally:
                park_servers()      # torch's own threads run next: no server spins
        ctl = np.zeros((n, 8), np.int64)
        key = ctl.ctypes.data
        run = self.runs[key] = {"work": work, "ctl": ctl}
        try:
            self.lib.GOMP_parallel(self.body.address, key, n, 0)
        finally:
            del self.runs[key]
            unpin_servers()
        if "error" in run:
            raise run["error"]
        return run["out"]


def _region_body(thread_num, num_threads, master, worker):
    """The body of _OpenMP's parallel region, compiled for these callbacks."""
    from numba import carray, cfunc, types

    from ._numba_ext import int64_pointer
    from ._spin import ENTERED, load_acquire, post, store_release
    STOP, READY, DONE = _OpenMP.STOP, _OpenMP.READY, _OpenMP.DONE
    CELL, TARGET = _OpenMP.CELL, _OpenMP.TARGET
    WAIT = 1 << 26          # reads (tens of ms) before thread 0 starts without a thread

    @cfunc(types.void(types.voidptr), nogil=True)
    def body(data):
        k = thread_num()
        m = num_threads()
        ctl = carray(data, (m, 8), np.int64)
        if k:
            worker(data)                        # serves until it reads stop
            store_release(ctl[k], DONE, 1)
            return
        for j in range(1, m):                   # until each has let go of the GIL
            row, n = ctl[j], 0
            while load_acquire(row, CELL) == 0 and load_acquire(row, READY) == 0 and n < WAIT:
                n += 1
            if load_acquire(row, CELL) != 0:
                cell = carray(int64_pointer(row[CELL]), 8)
                while (load_acquire(cell, ENTERED) < row[TARGET]
                       and load_acquire(row, READY) == 0 and n < WAIT):
                    n += 1
        master(data)                            # the call
        for j in range(1, m):
            row = ctl[j]
            store_release(row, STOP, 1)
            if load_acquire(row, CELL) != 0 and load_acquire(row, READY) == 0:
                post(carray(int64_pointer(row[CELL]), 8), 0, 0)   # ends its loop
        for j in range(1, m):
            while load_acquire(ctl[j], DONE) == 0:
                pass
    return body


_pool = None


def lend(n, work):
    """work() on this thread, inside a parallel region of torch's OpenMP pool whose other
    n - 1 threads serve fastlstm's servers meanwhile (see _OpenMP); as it is where that
    cannot be."""
    global _pool
    if _pool is None:
        _pool = _OpenMP()
    return _pool.run(n, work)
