"""pytest-benchmark plumbing: each case records its numbers, and the session writes results.

``--bench-out DIR`` writes DIR/results.json, DIR/results.md (speedups against every peer) and,
when matplotlib is installed, DIR/speedup.png and DIR/memory.png.
"""
import os
import sys

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, os.path.dirname(__file__))

RESULTS = []


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=None, help="folder for results.json/.md and plots")


def pytest_sessionfinish(session, exitstatus):
    out = session.config.getoption("--bench-out")
    if not out or not RESULTS:
        return
    import report

    report.write_results(out, RESULTS)
