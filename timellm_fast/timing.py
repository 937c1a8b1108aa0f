"""Median seconds of a call, the one timer of the CLI and the benchmark suites.

On a GPU: ``triton.testing.do_bench`` (warm-up, CUDA-event timing, an L2 flush before each call,
median), or CUDA events around each call where Triton cannot be imported. Elsewhere: the
wall-clock median of calls after one warm-up call, which times the host, not a kernel.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .kernels._environment import TRITON_IMPORT_ERROR

if TRITON_IMPORT_ERROR is None:
    from triton.testing import do_bench
else:  # pragma: no cover - depends on the install
    do_bench = None


def median_seconds(fn: Callable[[], object], *, cuda: bool, reps: int = 5, warmup_calls: int = 1,
                   rep_ms: int = 100) -> float:
    """Median seconds of fn(). cuda: fn runs on a CUDA device and is timed there, by do_bench for
    about rep_ms after rep_ms / 4 of warm-up; elsewhere (and with CUDA events where Triton cannot
    be imported) `reps` calls are timed after `warmup_calls` untimed ones."""
    if cuda and do_bench is not None:
        return do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms, return_mode="median") / 1e3
    for _ in range(warmup_calls):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
