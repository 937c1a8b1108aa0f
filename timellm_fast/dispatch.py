"""Which path runs an op: the Triton kernel or the eager reference.

Rules (README "Dispatch"):

* ``TIMELLM_FAST_BACKEND=eager`` always runs eager; ``=triton`` demands the kernel and raises
  if it cannot run; ``=auto`` (default) picks Triton where it can run, eager otherwise.
* Triton can run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton
  interpreter; slow, used by the CPU test suite).
* A fallback on a CUDA tensor is logged once per (op, reason): a user who bought a GPU should
  learn why they are not getting the kernel.

Every decision is counted in :data:`path_counts` so tests can prove which path ran.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
from typing import Iterator, Optional

import torch

logger = logging.getLogger("timellm_fast")

BACKEND_ENV = "TIMELLM_FAST_BACKEND"
_BACKENDS = ("auto", "triton", "eager")

#: (op name, "triton" | "eager") -> number of calls that took that path.
path_counts: "collections.Counter[tuple[str, str]]" = collections.Counter()
#: op name -> the path its most recent call took.
last_path: dict = {}
_logged: set = set()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def requested_backend() -> str:
    mode = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if mode not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={mode!r} is not one of {', '.join(_BACKENDS)}")
    return mode


def triton_device_problem(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on `device`, or None when it can."""
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        if interpreter_enabled():
            return "TRITON_INTERPRET=1 is set but the tensors are on CUDA"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (7, 5):
            return f"compute capability {major}.{minor} is below the supported 7.5"
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "tensors are on the CPU (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    return f"device type {device.type!r} has no Triton backend"


def choose(op: str, device: torch.device, unsupported: Optional[str] = None) -> str:
    """Pick "triton" or "eager" for one call of `op` on `device`, and record the choice.

    `unsupported` is the op's own reason why this configuration has no kernel (None if it has).
    """
    mode = requested_backend()
    reason = None
    if mode == "eager":
        path = "eager"
    else:
        reason = triton_device_problem(device) or unsupported
        if reason is None:
            path = "triton"
        elif mode == "triton":
            raise RuntimeError(f"{BACKEND_ENV}=triton but {op} cannot run in Triton: {reason}")
        else:
            path = "eager"
            if device.type == "cuda" and (op, reason) not in _logged:
                _logged.add((op, reason))
                logger.warning("timellm_fast: %s falls back to eager PyTorch: %s", op, reason)
    path_counts[(op, path)] += 1
    last_path[op] = path
    return path


@contextlib.contextmanager
def record_paths() -> Iterator["collections.Counter[tuple[str, str]]"]:
    """Counts the paths taken inside the block: ``with record_paths() as seen: ...``."""
    before = collections.Counter(path_counts)
    seen: "collections.Counter[tuple[str, str]]" = collections.Counter()
    try:
        yield seen
    finally:
        seen.update(path_counts - before)
