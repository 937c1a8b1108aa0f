"""Which path runs an op: the Triton kernel or the eager reference, and what the fused paths require
of a layer's submodules.

Rules (docs/design.md, "Dispatch" and "The drop-in contract"):

* ``TIMELLM_FAST_BACKEND=eager`` always runs eager; ``=triton`` demands the kernel and raises
  if it cannot run; ``=auto`` (default) picks Triton where it can run, eager otherwise.
* Triton can run on CUDA tensors, and on CPU tensors when Triton's interpreter is on
  (``TRITON_INTERPRET=1``; slow, used by the CPU test suite).
* A fallback on a CUDA tensor is logged once per (op, reason): a user who bought a GPU should
  learn why they are not getting the kernel.

The environment, read here only: ``TIMELLM_FAST_BACKEND`` on every call (os.environ), and
``TRITON_INTERPRET`` as Triton reads it, once, at import (kernels/_environment.py: @triton.jit
decides then whether kernels are compiled or interpreted).

Every decision is counted in :data:`path_counts` so tests can prove which path ran.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import os
import threading
from typing import Iterator, Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch.nn.modules import module as _module_hooks

from .kernels._environment import TRITON_IMPORT_ERROR, device_capability, interpreting

logger = logging.getLogger("timellm_fast")

BACKEND_ENV = "TIMELLM_FAST_BACKEND"
_BACKENDS = ("auto", "triton", "eager")

#: (op name, "triton" | "eager") -> number of calls that took that path.
path_counts: "collections.Counter[tuple[str, str]]" = collections.Counter()
#: op name -> the path its most recent call took.
last_path: dict = {}
_logged: set = set()


def plain(module, cls: type) -> bool:
    """Whether calling `module` computes exactly ``cls.forward`` on its own attributes, with nothing
    else attached: an instance of `cls` or of a subclass that overrides neither ``forward`` nor
    ``__call__`` (a parametrization's subclass qualifies; an adapter or FSDP2's wrapper class does
    not), without forward / backward hooks or pre-hooks of its own (hook-based weight_norm and
    spectral_norm, FSDP2 and DeepSpeed register them) and without an instance-level ``forward``.
    The fused paths compute the layers' submodules this way only where this holds for each of them
    (and no global module hook is registered: :func:`global_module_hooks`); asked on every call,
    as hooks can be added at any time."""
    kind = module.__class__
    return ((kind is cls or (isinstance(module, cls) and kind.forward is cls.forward
                             and kind.__call__ is cls.__call__))
            and not has_hooks(module)
            and "forward" not in module.__dict__)


def has_hooks(module) -> bool:
    """Whether `module` has forward / backward hooks or pre-hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_module_hooks() -> bool:
    """Whether a global module hook is registered (torch.nn.modules.module.register_module_*_hook):
    it fires on every submodule call, so the fused paths, which make none, do not apply."""
    hooks = _module_hooks
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def transform_active() -> bool:
    """Whether forward-mode AD (a dual level: torch.autograd.forward_ad, torch.func.jvp / jacfwd)
    or a torch.func transform (grad, vjp, jacrev, vmap) is active. The Triton ops have neither a
    forward-mode derivative nor batching rules: under these the layers compute through PyTorch's
    own ops, as Time-LLM's layers do. (Asked outside torch.compile's tracing only: a compiled graph
    holds the ops as they are.)"""
    if torch.compiler.is_compiling():
        return False
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


#: Triton's interpreter keeps the state of the program it runs in module globals, so two threads
#: running kernels at once corrupt each other's (InterpreterError): interpreted launchers run one at
#: a time. Compiled kernels need no lock (a launch is queued on a stream).
_INTERPRETER_LOCK = threading.RLock()


def one_interpreted_launch_at_a_time(launcher):
    """`launcher` itself where kernels are compiled; under Triton's interpreter, `launcher` holding
    the interpreter's lock (the same signature, for torch.library's schema inference)."""
    if not interpreting():
        return launcher

    @functools.wraps(launcher)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return launcher(*args, **kwargs)
    locked.__signature__ = inspect.signature(launcher, eval_str=True)  # annotations of the launcher's module
    return locked


def requested_backend() -> str:
    """TIMELLM_FAST_BACKEND as it is now: "auto" (unset or empty), "triton" or "eager"."""
    mode = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if mode not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={mode!r} is not one of {', '.join(_BACKENDS)}")
    return mode


def triton_device_problem(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on `device`, or None when it can."""
    if TRITON_IMPORT_ERROR:
        return TRITON_IMPORT_ERROR
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set but the tensors are on CUDA"
        major, minor = device_capability(device)
        if (major, minor) < (7, 5):
            return f"compute capability {major}.{minor} is below the supported 7.5"
        return None
    if device.type == "cpu":
        if interpreting():
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
    """Counts the paths taken inside the block: ``with record_paths() as seen: ...``; keys are
    (op, "triton" | "eager")."""
    before = collections.Counter(path_counts)
    seen: "collections.Counter[tuple[str, str]]" = collections.Counter()
    try:
        yield seen
    finally:
        seen.update(path_counts - before)
