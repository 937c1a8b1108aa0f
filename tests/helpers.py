"""Shared by the tests: the device, whether Triton runs on it, the tolerances of docs/spec.md §4, a
Triton launch counter and where to put it, and the other Tritons' venvs for the tests that compile
kernels.
Imported after conftest.py has set up the environment."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from timellm_fast import dispatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: why Triton cannot run on DEVICE, or None when it can
TRITON_PROBLEM = dispatch.triton_device_problem(DEVICE)
TRITON_RUNS = TRITON_PROBLEM is None
requires_triton = pytest.mark.skipif(not TRITON_RUNS, reason=f"Triton cannot run here: {TRITON_PROBLEM}")


def max_abs_err(got: torch.Tensor, oracle: torch.Tensor) -> float:
    return (got.detach().double() - oracle.detach().double()).abs().max().item()


#: docs/spec.md §4's one exception: the key-projection bias's gradient is zero in exact arithmetic (softmax
#: ignores a shift shared by every key), so its computed value is rounding noise, judged at 4x eager's
EAGER_FACTOR_EXCEPTIONS = {"key_projection.bias": 4.0}


def eager_factor(name: str) -> float:
    """How many times the eager layer's error a half-precision result may have (docs/spec.md §4)."""
    return EAGER_FACTOR_EXCEPTIONS.get(name.split()[-1], 2.0)


def assert_close_to_oracle(what: str, got: torch.Tensor, oracle: torch.Tensor,
                           eager_same_dtype: torch.Tensor = None) -> None:
    """fp32 results: max abs error <= 1e-4 (1 + max|oracle|). bf16/fp16 results: error no worse
    than 2x the error of the eager layer run in that dtype (4x for the key-projection bias's
    gradient, `what` ending in its name), plus a floor far below one ulp."""
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = 1.0 + oracle.abs().max().item()
    err = max_abs_err(got, oracle)
    if got.dtype in (torch.float32, torch.float64):
        tol = 1e-4 * scale
        assert err <= tol, f"{what}: max abs err {err:.3e} > fp32 tolerance {tol:.3e}"
    else:
        assert eager_same_dtype is not None, f"{what}: {got.dtype} needs the eager result to judge"
        assert eager_same_dtype.dtype == got.dtype
        eager_err = max_abs_err(eager_same_dtype, oracle)
        factor = eager_factor(what)
        tol = factor * eager_err + 1e-6 * scale
        assert err <= tol, (f"{what}: max abs err {err:.3e} > {factor:g}x eager {got.dtype} error "
                            f"{eager_err:.3e}")


class LaunchCounter:
    """Wraps a Triton kernel: counts `kernel[grid](...)` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.launches += 1
            return launch(*args, **kwargs)
        return counted


#: kernel -> the module of timellm_fast.kernels whose launcher starts it: where a test swaps it
KERNEL_MODULES = {
    "attention_fwd_kernel": "attention_forward", "dropout_keep_mask_kernel": "attention_forward",
    "attention_bwd_delta_kernel": "attention_backward", "attention_bwd_protos_kernel": "attention_backward",
    "attention_bwd_rows_kernel": "attention_backward", "prototype_logits_kernel": "prototype_side",
    "prototype_logits_bwd_kernel": "prototype_side", "patch_window_fwd": "patch_embedding_forward",
    "patch_conv_gemm": "patch_embedding_forward", "patch_window_dweight": "patch_embedding_backward",
    "patch_dweight_reduce": "patch_embedding_backward", "patch_window_dx": "patch_embedding_backward",
    "patch_fold": "patch_embedding_backward",
}


def swap_kernel(monkeypatch, name: str, stand_in):
    """Replaces kernel `name` where its launcher finds it by stand_in(kernel) (a LaunchCounter, say)
    for the test; returns the stand-in."""
    module = importlib.import_module(f"timellm_fast.kernels.{KERNEL_MODULES[name]}")
    replacement = stand_in(getattr(module, name))
    monkeypatch.setattr(module, name, replacement)
    return replacement


REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def bench_module(name: str):
    """bench/<name>.py, imported as `name` (the AOT tooling and tuners live there, outside the
    installed library); bench/ goes on sys.path for the modules it imports itself."""
    if name not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.append(str(BENCH))
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
        spec.loader.exec_module(module)
    return sys.modules[name]
#: toolchain -> (the venv that holds it, the Triton version it must hold, what to pip install there);
#: .ci/run makes them: Triton 3.6 (torch 2.11, our GPU machines) and Triton 3.8 (what
#: `pip install torch` brings with torch 2.14.1)
AOT_VENVS = {
    "triton36": (".venv-aot-triton36", "3.6", "torch==2.13.0 triton==3.6.0 'numpy<2.4'"),
    "triton38": (".venv-aot-triton38", "3.8", "torch==2.13.0 triton==3.8.0 numpy"),
}
TOOLCHAINS = {"this-env": sys.executable,
              **{name: str(REPO / venv / "bin" / "python") for name, (venv, _, _) in AOT_VENVS.items()}}


def toolchain_python(toolchain: str) -> str:
    """The toolchain's python, or a skip that says how to make it."""
    python = TOOLCHAINS[toolchain]
    if not Path(python).exists():
        venv, _, packages = AOT_VENVS[toolchain]
        pytest.skip(f"no {python}: python3 -m venv {venv} && {venv}/bin/pip install {packages} && "
                    f"{venv}/bin/pip install --no-deps -e .")
    return python


def compiled_kernels_env() -> dict:
    """A child process's environment for compiled kernels: no interpreter (under TRITON_INTERPRET=1
    the kernels are interpreter objects), this repository's install."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env
