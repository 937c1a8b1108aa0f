"""Dispatch rules: env override, fallback reasons, one log line per CUDA fallback reason."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from timellm_fast import dispatch
from timellm_fast.kernels import _environment


def test_choose_records_the_path():
    with dispatch.record_paths() as seen:
        dispatch.choose("demo_op", torch.device("cpu"), unsupported="no kernel for this")
    assert seen == {("demo_op", "eager"): 1}
    assert dispatch.last_path["demo_op"] == "eager"


def test_eager_env_wins_over_a_runnable_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "eager")
    monkeypatch.setattr(dispatch, "triton_device_problem", lambda device: None)
    assert dispatch.choose("demo_op", torch.device("cpu")) == "eager"


def test_backend_variable_is_read_at_every_call(monkeypatch):
    """TIMELLM_FAST_BACKEND as it is at each call: set, changed, removed; a bad value raises at
    every call and names the variable."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(dispatch, "triton_device_problem", lambda device: None)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "eager")
    assert dispatch.choose("demo_op", cpu) == "eager"
    monkeypatch.setenv(dispatch.BACKEND_ENV, " Triton ")
    assert dispatch.choose("demo_op", cpu) == "triton"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fast")
    for _ in range(2):
        with pytest.raises(ValueError, match="TIMELLM_FAST_BACKEND='fast' is not one of auto, triton, eager"):
            dispatch.choose("demo_op", cpu)
    monkeypatch.delenv(dispatch.BACKEND_ENV)
    assert dispatch.requested_backend() == "auto"


def test_cuda_fallback_logs_once_per_reason(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "triton_device_problem", lambda device: None)
    monkeypatch.setattr(dispatch, "_logged", set())
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="timellm_fast"):
        for _ in range(3):
            assert dispatch.choose("demo_op", cuda, unsupported="E=24 has no kernel") == "eager"
        assert dispatch.choose("demo_op", cuda, unsupported="another reason") == "eager"
        assert dispatch.choose("demo_op", cuda) == "triton"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "demo_op falls back to eager PyTorch: E=24 has no kernel" in messages[0]


def test_interpreter_flag_is_read_at_import(monkeypatch):
    """@triton.jit picks compiled or interpreted kernels when they are defined: a later change of
    TRITON_INTERPRET must not make dispatch believe otherwise."""
    before = dispatch.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if before else "1")
    assert dispatch.interpreting() == before


def test_cpu_fallback_is_silent(monkeypatch, caplog):
    monkeypatch.setattr(_environment, "INTERPRETING", False)
    with caplog.at_level(logging.WARNING, logger="timellm_fast"):
        assert dispatch.choose("demo_op", torch.device("cpu")) == "eager"
    assert not caplog.records


def test_forced_triton_names_the_reason(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    monkeypatch.setattr(_environment, "INTERPRETING", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.choose("demo_op", torch.device("cpu"))


def test_without_triton_the_package_imports_and_both_layers_run_eager():
    """An install whose Triton cannot be imported: the package, its CLI and both layers still work
    on the eager path (forward, backward, eval and training), even with the interpreter requested,
    and a demanded Triton backend names the import failure."""
    script = """
import os, sys
sys.modules["triton"] = None  # `import triton` now fails as it does where Triton is not installed
import torch
import timellm_fast, timellm_fast.cli
from timellm_fast import PatchEmbedding, ReprogrammingLayer, dispatch
assert dispatch.TRITON_IMPORT_ERROR.startswith("triton cannot be imported"), dispatch.TRITON_IMPORT_ERROR
assert dispatch.triton_device_problem(torch.device("cpu")) == dispatch.TRITON_IMPORT_ERROR
embed = PatchEmbedding(16, 8, 4, 0.1)
layer = ReprogrammingLayer(16, 4, d_llm=24)
source = torch.randn(10, 24, requires_grad=True)
for training in (True, False):
    embed.train(training), layer.train(training)
    y, _ = embed(torch.randn(2, 3, 32))
    out = layer(y, source, source)
    assert out.shape == (6, y.shape[1], 24) and torch.isfinite(out).all()
    out.sum().backward()
assert embed.value_embedding.tokenConv.weight.grad is not None and source.grad is not None
assert dict(dispatch.path_counts) == {("patch_embedding", "eager"): 2, ("reprogramming_attention", "eager"): 2}
os.environ[dispatch.BACKEND_ENV] = "triton"
try:
    embed(torch.randn(2, 3, 32))
except RuntimeError as exc:
    assert "triton cannot be imported" in str(exc), exc
else:
    raise AssertionError("TIMELLM_FAST_BACKEND=triton ran without Triton")
print("eager without triton")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "eager without triton", proc.stderr[-3000:]
