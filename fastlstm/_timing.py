"""One timing rule for every figure fastlstm prints."""
import time

import numpy as np


def median_time(fn, min_time=0.2, min_repeats=5, max_repeats=1000):
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < min_time
                                       and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
