"""pytest-benchmark plumbing: each case records its numbers, and the session writes results.

``--bench-out DIR`` writes DIR/results.json and DIR/results.md (speedups against every peer)
after every case, so a run cut short keeps what it measured, and DIR/speedup.png and
DIR/memory.png at the end when matplotlib is installed.

``--bench-budget-s N`` runs the cases in priority order (each suite's ``priority(params)``:
the issue's targets first, ``compile-max-autotune`` last) and skips what would start after N
seconds; the skipped cases are listed in results.json.
"""
import os
import sys
import time

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, os.path.dirname(__file__))

RESULTS = []
OVER_BUDGET = []
_STATE = {"start": None, "budget": None, "out": None}


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=None, help="folder for results.json/.md and plots")
    parser.addoption("--bench-budget-s", type=float, default=None,
                     help="skip cases that would start after this many seconds (priority order)")


def pytest_configure(config):
    _STATE.update(start=time.monotonic(), budget=config.getoption("--bench-budget-s"),
                  out=config.getoption("--bench-out"))


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each case compiles its own torch.compile graphs: dynamo's caches are cleared first, or
    after its recompile limit (8 new module objects for one forward) it would silently run the
    "compile" rows in eager."""
    torch._dynamo.reset()
    yield


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
    import report

    report.write_results(_STATE["out"], RESULTS, over_budget=OVER_BUDGET, plots=final)


def pytest_runtest_teardown(item, nextitem):
    _write(final=False)


def pytest_sessionfinish(session, exitstatus):
    _write(final=True)
