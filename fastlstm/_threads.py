"""Running the two directions of a bidirectional layer at once.

On this kind of machine (2 cores) the two recurrences, each on one core with a
single-threaded BLAS, beat running them one after the other with BLAS on both
cores: measured at medium size (B=64, T=100, I=128, H=256, float32), fwd+bwd of
one bidirectional layer took 213 ms against 296 ms. BLAS calls from other threads
during such a call also run single-threaded (threadpoolctl changes a process-wide
setting).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_state = {}


def _forget_in_child():
    """A forked child inherits the pool object but not its worker thread: a task
    submitted there would wait forever. Start afresh (a new lock too: the parent's
    may have been held by another thread at the fork)."""
    global _lock
    _lock = threading.Lock()
    _state.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _controller():
    with _lock:
        if "controller" not in _state:
            from threadpoolctl import ThreadpoolController
            _state["controller"] = ThreadpoolController()
            _state["pool"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastlstm")
    return _state["controller"], _state["pool"]


def parallel_worthwhile(work):
    """Whether `work` (multiply-adds of one direction's fwd or bwd) is large enough
    for two threads to pay for their start-up; never on a single core."""
    return (os.cpu_count() or 1) > 1 and work >= 50_000_000


def run_pair(first, second):
    """Call first() here and second() on a worker thread, BLAS single-threaded."""
    controller, pool = _controller()
    with controller.limit(limits=1, user_api="blas"):
        future = pool.submit(second)
        try:
            first()
        finally:
            future.result()
