"""Which path runs an op: the Triton kernel or the eager reference.

Rules (docs/design.md, "Dispatch"):

* ``TIMELLM_FAST_BACKEND=eager`` always runs eager; ``=triton`` demands the kernel and raises
  if it cannot run; ``=auto`` (default) picks Triton where it can run, eager otherwise.
* Triton can run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton
  interpreter; slow, used by the CPU test suite).
* A fallback on a CUDA tensor is logged once per (op, reason): a user who bought a GPU should
  learn why they are not getting the kernel.

Every decision is counted in :data:`path_counts` so tests can prove which path ran.

On the Triton path an op (timellm_fast.triton_op.TritonOp) reaches its launchers one of two ways,
as :func:`direct_launch` decides: in plain eager mode straight through a
``torch.autograd.Function`` (the ``torch.library`` dispatch of a custom op costs tens of microseconds of host time per call, which at the small official shapes
is more than the kernel), and through the op's ``torch.library`` custom op whenever something
must see the op as one operator: ``torch.compile``/export/``torch.jit.trace`` tracing, a TorchDispatchMode
(FakeTensorMode, make_fx, operator loggers), ``torch.func`` transforms, or tensor subclasses.
Both routes run the same launchers and the same backward; :data:`route_counts` counts them.
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
#: set to 0 to send every Triton-path call through its custom op (debugging, route benchmarks)
DIRECT_ENV = "TIMELLM_FAST_DIRECT"
_BACKENDS = ("auto", "triton", "eager")

#: (op name, "triton" | "eager") -> number of calls that took that path.
path_counts: "collections.Counter[tuple[str, str]]" = collections.Counter()
#: op name -> the path its most recent call took.
last_path: dict = {}
_logged: set = set()
#: (op name, "direct" | "custom_op") -> calls of the Triton path that took that route.
route_counts: "collections.Counter[tuple[str, str]]" = collections.Counter()
#: the tensor types the direct route accepts (subclasses may have their own dispatch rules)
_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_is_functorch_wrapper = torch._C._functorch.is_functorch_wrapped_tensor


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
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks)
            and "forward" not in module.__dict__)


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


def triton_import_error() -> Optional[str]:
    """Why Triton cannot be imported in this process, or None when it can."""
    return TRITON_IMPORT_ERROR


class EnvironmentSwitch:
    """An environment variable the op layer reads on every call, as its value is at that moment.

    ``os.environ.get`` runs several Python-level calls (key encoding, the Mapping protocol): about
    1 us, several inside a busy layer call, twice per call. Where CPython's os.environ keeps its
    encoded dict (``os.environ._data``, which every assignment to os.environ updates) it is read
    directly, and the parsed value is reused while the raw value is the same object (a new
    assignment stores a new one; the one held here cannot be freed and its address reused).
    """

    def __init__(self, name: str, parse):
        self.name = name
        self._parse = parse  # str or None (unset) -> value; raises for a bad value (not remembered)
        data = getattr(os.environ, "_data", None)
        self._data = data if isinstance(data, dict) else None
        self._key = os.environ.encodekey(name) if self._data is not None else name
        self._seen = (object(), None)  # (raw value, parsed value), replaced as one

    def value(self):
        raw = self._data.get(self._key) if self._data is not None else os.environ.get(self.name)
        seen_raw, parsed = self._seen
        if raw is not seen_raw:
            text = raw if raw is None or self._data is None else os.environ.decodevalue(raw)
            parsed = self._parse(text)
            self._seen = (raw, parsed)
        return parsed


def _parse_backend(text: Optional[str]) -> str:
    mode = (text or "auto").strip().lower() or "auto"
    if mode not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={mode!r} is not one of {', '.join(_BACKENDS)}")
    return mode


_BACKEND_SWITCH = EnvironmentSwitch(BACKEND_ENV, _parse_backend)
_DIRECT_SWITCH = EnvironmentSwitch(DIRECT_ENV, lambda text: text != "0")


def requested_backend() -> str:
    return _BACKEND_SWITCH.value()


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
    mode = _BACKEND_SWITCH.value()  # requested_backend(), one frame fewer on every call
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


#: True inside custom_op_route (set only there): every Triton-path call takes its custom op
_custom_op_forced = False


def direct_launch(op: str, *tensors: torch.Tensor) -> bool:
    """Whether a Triton-path call of `op` on `tensors` may skip its torch.library custom op.

    Only in plain eager mode: nothing is tracing (torch.compile, export, torch.jit.trace), no TorchDispatchMode
    or torch.func transform is active, and every tensor is a plain tensor or Parameter, none of them
    a functorch wrapper (a "dead" one outlives its transform: torch's dispatch unwraps it, the
    direct route would not). Anything else must see the custom op as one operator, so it gets the
    custom op. ``TIMELLM_FAST_DIRECT=0``
    or :func:`custom_op_route` turns the direct route off.
    """
    direct = (not torch.compiler.is_compiling()
              and not torch.jit.is_tracing()  # a trace must record the op, not run past it
              and not _custom_op_forced
              and _DIRECT_SWITCH.value()
              and torch._C._len_torch_dispatch_stack() == 0
              and not torch._C._are_functorch_transforms_active()
              and _PLAIN_TENSOR_TYPES.issuperset(map(type, tensors))
              and not any(map(_is_functorch_wrapper, tensors)))
    route_counts[(op, "direct" if direct else "custom_op")] += 1
    return direct


@contextlib.contextmanager
def custom_op_route() -> Iterator[None]:
    """Inside the block every Triton-path call goes through its custom op (the backward of a
    forward taken inside follows it, wherever it runs): to compare the two routes."""
    global _custom_op_forced
    saved = _custom_op_forced
    _custom_op_forced = True
    try:
        yield
    finally:
        _custom_op_forced = saved


#: whether a torch.profiler is recording: then a direct-route launch is named in its trace as the
#: custom op would be (``timellm_fast::...``, torch.profiler.record_function), else nothing is entered
profiling = torch._C._autograd._profiler_enabled


@contextlib.contextmanager
def _record(counter: "collections.Counter[tuple[str, str]]") -> Iterator["collections.Counter[tuple[str, str]]"]:
    before = collections.Counter(counter)
    seen: "collections.Counter[tuple[str, str]]" = collections.Counter()
    try:
        yield seen
    finally:
        seen.update(counter - before)


def record_paths():
    """Counts the paths taken inside the block: ``with record_paths() as seen: ...``; keys are
    (op, "triton" | "eager")."""
    return _record(path_counts)


def record_routes():
    """Counts the routes Triton-path calls took inside the block; keys are (op, "direct" | "custom_op")."""
    return _record(route_counts)
