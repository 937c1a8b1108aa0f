"""One benchmark case: time, memory and rates of one implementation, recorded for the report."""
from __future__ import annotations

import gc
import time
from typing import Callable

import pytest
import torch

from timellm_fast import dispatch
from timellm_fast.timing import median_seconds

from common import DEVICE, DTYPES, ON_GPU, SHAPES, dtype_name, gpu_activity, is_oom, peak_memory_bytes, rates


#: the host timing of a case (no GPU): median of HOST_REPS calls after the case's own warm-up calls
HOST_REPS, HOST_WARMUP_CALLS = 5, 1


def kernel_grid(impls):
    """The kernel suites' grid: every shape x dtype x implementation x (fwd, fwd+bwd); test ids
    read shape-dtype-impl-mode."""
    def decorate(test):
        test = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)(test)
        test = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)(test)
        test = pytest.mark.parametrize("impl", impls)(test)
        return pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])(test)
    return decorate


def pick(impls: dict, impl: str):
    """impls[impl], or a skip where the grid names a peer that runs only on a GPU."""
    if impl not in impls:
        pytest.skip(f"{impl} is a peer of the full grid only (a GPU, or TIMELLM_FAST_BENCH_FULL=1): the reduced "
                    f"CPU grid leaves out torch.compile's minutes of compiling")
    return impls[impl]


def skip_without_triton(impl: str, why: str) -> None:
    """A skip that names the reason, for a row that runs only on our Triton path (`why`: what it
    measures that has no eager path) on a machine where Triton cannot run."""
    problem = dispatch.triton_device_problem(DEVICE)
    if problem is not None:
        pytest.skip(f"{impl}: {why}, and Triton cannot run here ({problem})")


def synchronized(step: Callable[[], object]) -> Callable[[], None]:
    """step, then wait for the GPU: pytest-benchmark's own clock would otherwise time launches."""
    def run():
        step()
        if ON_GPU:
            torch.cuda.synchronize()
    return run


def run_case(benchmark, results: list, *, op: str, shape, dtype: torch.dtype, mode: str, impl: str,
             step: Callable[[], object], cost: tuple, extra: dict = None) -> dict:
    """Times `step` (a forward, or forward + backward) and appends a result row (plus `extra`).

    The reported time is `median_seconds` (do_bench on a GPU); the row's "timing" says how it
    was taken. On a GPU pytest-benchmark's pedantic rounds (synchronized) are kept for its own
    table and history, fewer for slow steps; on a CPU its timing is off (bench/conftest.py) and
    its call is one more untimed warm-up.
    """
    row = dict(op=op, shape=shape.name, rows=shape.rows, dtype=dtype_name(dtype), mode=mode, impl=impl,
               device=torch.cuda.get_device_name() if ON_GPU else "cpu", flops=cost[0], bytes=cost[1], **(extra or {}))
    timed = synchronized(step)
    oom = False
    try:
        t0 = time.perf_counter()
        timed()  # warm-up: compiles Triton kernels and torch.compile graphs
        first = time.perf_counter() - t0
        rounds = (10 if first < 0.05 else 3) if ON_GPU else 2
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        seconds = median_seconds(step, cuda=ON_GPU, reps=HOST_REPS, warmup_calls=HOST_WARMUP_CALLS)
        untimed = 1 + (rounds if benchmark.enabled else 1) + HOST_WARMUP_CALLS
        row["timing"] = ("triton.testing.do_bench median (CUDA events, L2 flushed before each call)" if ON_GPU else
                         f"wall-clock median of {HOST_REPS} calls after {untimed} untimed ones")
        activity = gpu_activity(step)
        row.update(status="ok", seconds=seconds, peak_bytes=peak_memory_bytes(step), **activity,
                   **rates(cost[0], cost[1], seconds, dtype, activity["device_seconds"]))
    except Exception as exc:  # an OOM is a result (eager at Traffic scale), not a crash
        if not is_oom(exc):
            raise
        row.update(status="OOM")
        oom = True
    if oom and ON_GPU:  # outside the except block: the traceback no longer pins the tensors
        gc.collect()
        torch.cuda.empty_cache()
    benchmark.extra_info.update(row)
    results.append(row)
    return row
