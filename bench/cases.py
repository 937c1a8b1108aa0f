"""One benchmark case: time, memory and rates of one implementation, recorded for the report."""
from __future__ import annotations

from typing import Callable

import torch

from common import ON_GPU, dtype_name, is_oom, measure_seconds, peak_memory_bytes, rates


def run_case(benchmark, results: list, *, op: str, shape, dtype: torch.dtype, mode: str, impl: str,
             step: Callable[[], object], cost: tuple) -> dict:
    """Times `step` (a forward, or forward + backward) and appends a result row."""
    row = dict(op=op, shape=shape.name, rows=shape.rows, dtype=dtype_name(dtype), mode=mode, impl=impl,
               device=torch.cuda.get_device_name() if ON_GPU else "cpu", flops=cost[0], bytes=cost[1])
    try:
        benchmark.pedantic(step, rounds=10 if ON_GPU else 2, iterations=1, warmup_rounds=1)
        seconds = measure_seconds(step)
        row.update(status="ok", seconds=seconds, peak_bytes=peak_memory_bytes(step),
                   **rates(cost[0], cost[1], seconds, dtype))
    except Exception as exc:  # an OOM is a result (eager at Traffic scale), not a crash
        if not is_oom(exc):
            raise
        row.update(status="OOM")
        if ON_GPU:
            torch.cuda.empty_cache()
    benchmark.extra_info.update(row)
    results.append(row)
    return row
