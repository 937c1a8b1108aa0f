"""Dispatch rules: env override, fallback reasons, one log line per CUDA fallback reason."""
import logging

import pytest
import torch

from timellm_fast import dispatch


def test_choose_records_the_path():
    with dispatch.record_paths() as seen:
        dispatch.choose("demo_op", torch.device("cpu"), unsupported="no kernel for this")
    assert seen == {("demo_op", "eager"): 1}
    assert dispatch.last_path["demo_op"] == "eager"


def test_eager_env_wins_over_a_runnable_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "eager")
    monkeypatch.setattr(dispatch, "triton_device_problem", lambda device: None)
    assert dispatch.choose("demo_op", torch.device("cpu")) == "eager"


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


def test_cpu_fallback_is_silent(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="timellm_fast"):
        assert dispatch.choose("demo_op", torch.device("cpu")) == "eager"
    assert not caplog.records


def test_forced_triton_names_the_reason(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.choose("demo_op", torch.device("cpu"))
