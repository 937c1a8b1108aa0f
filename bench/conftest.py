"""pytest-benchmark plumbing: each case records its numbers, and the session writes results.

``--bench-out DIR`` writes DIR/results.json and DIR/results.md after every case, so a run cut
short keeps what it measured, and the plots at the end when matplotlib is installed (a GPU run:
speedup.png and memory.png; a CPU run: times.png); the last line names every file written. DIR
must be new or empty: a results folder is never overwritten.

One time per case: results.md's (``median_seconds``; do_bench on a GPU). On a CPU
pytest-benchmark's own timing is turned off (``--benchmark-disable``: its fixture then calls the
step once), so it prints no second table of other numbers for the same cases.

``--bench-budget-s N`` runs the cases in priority order (each suite's ``priority(params)``:
the performance targets first, ``compile-max-autotune`` last) and skips what would start after N
seconds; the skipped cases are listed in results.json.

Our layers run the real dispatch: their Triton kernels on a GPU, their eager path on a CPU (the
suites then prove they run; they time no kernel). Real data: when $TIMELLM_FAST_DATA is unset,
the ETT CSVs in ../shared/data beside this checkout are used where that folder exists.
"""
import os
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
_SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not os.environ.get("TIMELLM_FAST_DATA") and (_SHARED_DATA / "ETTh1.csv").is_file():
    os.environ["TIMELLM_FAST_DATA"] = str(_SHARED_DATA)

sys.path.insert(0, os.path.dirname(__file__))

import report  # noqa: E402  (bench/, on the path above)
from timellm_fast import dispatch  # noqa: E402  (after the environment above)

RESULTS = []
OVER_BUDGET = []
_STATE = {"start": None, "budget": None, "out": None}


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=None, help="folder for results.json/.md and plots")
    parser.addoption("--bench-budget-s", type=float, default=None,
                     help="skip cases that would start after this many seconds (priority order)")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's (trylast) reads --benchmark-disable
def pytest_configure(config):
    out = config.getoption("--bench-out")
    if out and os.path.isdir(out) and os.listdir(out):
        raise pytest.UsageError(f"--bench-out {out} already holds {', '.join(sorted(os.listdir(out)))}; "
                                f"results are never overwritten: name a new folder")
    if not torch.cuda.is_available() and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True
    _STATE.update(start=time.monotonic(), budget=config.getoption("--bench-budget-s"), out=out)


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each case compiles its own torch.compile graphs: dynamo's caches are cleared first, or
    after its recompile limit (8 new module objects for one forward) it would silently run the
    "compile" rows in eager."""
    torch._dynamo.reset()
    yield


@pytest.fixture(autouse=True)
def _record_paths():
    """Each row a case appends says which path our ops took in it ("paths": {"op/path": calls};
    empty for peers that do not call our ops): the Triton kernels, or their eager path."""
    before = len(RESULTS)
    with dispatch.record_paths() as seen:
        yield
    for row in RESULTS[before:]:
        row["paths"] = {f"{op}/{path}": calls for (op, path), calls in sorted(seen.items())}


def case_priority(item) -> float:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("impl") == "compile-max-autotune":
        return 3  # minutes of autotuning per case: only when everything else has run
    rule = getattr(item.module, "priority", None)
    return rule(params) if rule else 2


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=case_priority)  # stable: within a priority, the suites' own order


def pytest_runtest_setup(item):
    budget = _STATE["budget"]
    if budget is not None and time.monotonic() - _STATE["start"] > budget:
        OVER_BUDGET.append(item.nodeid)
        pytest.skip(f"over the bench time budget of {budget:.0f} s")


def _write(final: bool) -> None:
    if not _STATE["out"] or not (RESULTS or OVER_BUDGET):
        return
    written = report.write_results(_STATE["out"], RESULTS, over_budget=OVER_BUDGET, plots=final)
    if final:  # on its own line: pytest's progress line may still be open
        print(f"\nbenchmark results written to {_STATE['out']}: {', '.join(written)}", flush=True)


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown, which completes the case's row
def pytest_runtest_teardown(item, nextitem):
    _write(final=False)


def pytest_sessionfinish(session, exitstatus):
    _write(final=True)
