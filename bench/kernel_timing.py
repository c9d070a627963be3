"""What the kernel benchmarks share: whether they can run here, their two timers (triton's
do_bench on a GPU, wall time for --smoke), and the relative error each kernel's check may show."""

from __future__ import annotations

import os
import statistics
import time

import torch

#: the largest relative error (kernel against torch reference, the "rel. error" the scripts print)
#: accepted per input dtype; the low-precision bound covers outputs stored in that dtype (bias
#: clipped sum, per-sample grads). tests/test_bench_kernels_smoke.py and bench/gpu_summary.py check it.
ERROR_BOUND = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}


def can_run(script: str, smoke: bool) -> bool:
    """--smoke: yes, in triton's interpreter (set before triton is imported). Otherwise only with
    CUDA and triton; if not, say why (the caller exits 0)."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print(f"{script}: no CUDA device; nothing to time")
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        print(f"{script}: triton is not installed; nothing to time")
        return False
    return True


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
