"""The two timers of the kernel benchmarks: triton's do_bench on a GPU, wall time for --smoke."""

from __future__ import annotations

import statistics
import time


def gpu_milliseconds(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def cpu_milliseconds(fn, repeats: int = 3) -> float:
    """Median wall time of a few calls (--smoke: do_bench needs CUDA)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
