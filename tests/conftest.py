"""Test setup: kernels run natively on a GPU when there is one, else in Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so this runs first.
This file and the CLI's check command are the only places that turn the interpreter on.

Real data: when $TIMELLM_FAST_DATA is unset, the ETT CSVs in ../shared/data beside this checkout
(our development and CI machines have them) are used where that folder exists; elsewhere the
tests run on the seeded synthetic series.
"""
import os
from pathlib import Path

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not os.environ.get("TIMELLM_FAST_DATA") and (_SHARED_DATA / "ETTh1.csv").is_file():
    os.environ["TIMELLM_FAST_DATA"] = str(_SHARED_DATA)

import pytest  # noqa: E402

from helpers import DEVICE  # noqa: E402
from timellm_fast import dispatch  # noqa: E402


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Each test starts from automatic dispatch; tests that force a path set the variable."""
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
