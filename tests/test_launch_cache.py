"""The launch cache (kernels/_launch.launch) starts the compiled kernel Triton's own path would,
with the same arguments, under every Triton a user gets.

No GPU is needed: tests/launch_cache_check.py runs the op layer in a child process on the
recording driver (kernels/recording_driver.py), which compiles the kernels for sm_90 and records
each launch at the driver's launcher. For every launch it compares the cached path with
Triton's JITFunction.run on the same arguments: the same CompiledKernel, the same grid, the
same arguments in signature order; a repeat must be served from the cache (a launch plan's
remembered kernel included), and after clear_launch_cache nothing may be. The cases cover
what Triton specializes on: dtypes, alignment (operands at odd offsets), integers equal to 1
(one row), both attention forms, dropout, the deterministic backward and the patch embedding.
What only a GPU proves: that the launcher, given those same arguments, runs the kernel (it is
Triton's own launcher either way), timed on the wall clock by bench/host_overhead.py's GPU twin
in bench/gpu_session.sh.
"""
import json
import subprocess

import pytest

from helpers import REPO, TOOLCHAINS, compiled_kernels_env, toolchain_python
from timellm_fast.kernels import _launch


@pytest.mark.parametrize("toolchain", sorted(TOOLCHAINS))
def test_cached_launches_match_tritons_own(toolchain):
    python = toolchain_python(toolchain)
    args = [] if toolchain == "this-env" else ["--quick"]  # the other Tritons: the specialization cases
    proc = subprocess.run([python, str(REPO / "tests" / "launch_cache_check.py"), *args], env=compiled_kernels_env(),
                          capture_output=True, text=True, timeout=900)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, f"no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    problems = {r["case"]: r["problems"] for r in results if r["problems"]}
    assert not problems, json.dumps(problems, indent=1)
    assert all(r["launches"] > 0 for r in results)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_interned_params_are_one_dict_per_configuration():
    first = _launch.interned_params(BLOCK=16, num_warps=4)
    assert _launch.interned_params(BLOCK=16, num_warps=4) is first
    assert _launch.interned_params(BLOCK=32, num_warps=4) is not first


def test_the_interpreter_takes_tritons_own_path(monkeypatch):
    """Under the interpreter (this process on a CPU machine) nothing is cached: an interpreted
    kernel has no compiled launcher."""
    if not _launch.interpreting():
        pytest.skip("compiled kernels here: the cached path is what runs")
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **params: calls.append((grid, args, params))

    before = _launch.cached_launches()
    _launch.launch(Kernel(), (2,), {"BLOCK": 16}, 1, 2.0)
    assert calls == [((2,), (1, 2.0), {"BLOCK": 16})]
    assert _launch.cached_launches() == before
