"""Small helpers shared by the kernel launchers (no math lives here), and :func:`launch`, which
every launcher starts its kernels with."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, NamedTuple, Optional, Tuple

import torch
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from ._environment import interpreting

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
#: signature strings for ahead-of-time compilation (triton.compile with ASTSource)
SIG_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


_SM_COUNT: dict = {}


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, asked once per device (persistent kernels size
    their grid by it on every call); 1 elsewhere: the interpreter runs programs one at a time."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNT.get(index)
    if count is None:
        count = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: plain integer arithmetic (triton.cdiv is a constexpr function
    object, ~2 us per host call, and a launch computes several)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1); plain Python for the same reason as cdiv."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def dot_dtype(*operand_dtypes: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype tl.dot operands are cast to.

    Half-precision operands go to the tensor cores only when *every* operand already is that
    dtype: products of two bf16 (or fp16) values are exact in the fp32 accumulator, so the
    result equals an fp32 computation. Any mix (e.g. bf16 data with an fp32 weight) computes
    in fp32 so no operand is rounded. fp32 dots use IEEE precision (no TF32).

    Under TRITON_INTERPRET=1, tl.dot on bf16 operands multiplies raw bits (triton-lang/triton
    #11584), so the interpreter computes bf16 dots in fp32: the bf16 tensor-core path itself is
    proven only on a GPU. (The attention kernels round the operands they compute to bf16 there,
    see reprogramming_attention._dot_operand, so the interpreter's numerics follow the GPU's.)
    """
    first = operand_dtypes[0]
    if first in (torch.bfloat16, torch.float16) and all(d == first for d in operand_dtypes):
        if first == torch.bfloat16 and (interpreting() or device.type != "cuda"):
            return torch.float32
        return first
    return torch.float32


def input_precision(dt: torch.dtype, allow_tf32: bool = False) -> str:
    if dt == torch.float32:
        return "tf32" if allow_tf32 else "ieee"
    return "ieee"  # ignored by Triton for half-precision operands


def store_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes before the launcher's final cast.

    Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest even, even with
    fp_downcast_rounding="rtne"; a GPU rounds correctly. So under the
    interpreter, bf16 results are written in fp32 and rounded by torch.
    """
    if out_dtype == torch.bfloat16 and interpreting():
        return torch.float32
    return out_dtype


# ---------------------------------------------------------------------------------------------
# launching: the compiled kernel cached per specialization
# ---------------------------------------------------------------------------------------------

#: set to 0 to start every kernel through Triton's own JITFunction.run (read once, at import)
LAUNCH_CACHE_ENV = "TIMELLM_FAST_LAUNCH_CACHE"
launch_cache_enabled = os.environ.get(LAUNCH_CACHE_ENV, "1") != "0"
#: at most this many compiled-kernel entries are remembered; the cache starts over beyond it
#: (distinct row counts make distinct entries: a long run over ever-changing shapes must not grow)
LAUNCH_CACHE_ENTRIES = 4096


class _CachedLaunch(NamedTuple):
    kernel: Any  # the JITFunction and
    params: dict  # the launch's keyword arguments, both held so that their ids in the key stay theirs
    compiled: Any  # triton CompiledKernel
    run: Any  # its driver launcher (compiled.run, a lazily set property: set once it has launched)
    constexpr_tail: Tuple  # the constexpr values after the positional arguments, in signature order


_CACHED: dict = {}
#: counts clear_launch_cache calls: a PlannedLaunch's remembered entry is valid only in its generation
_generation = 0


def _argument_key(args: tuple) -> list:
    """What Triton specializes a launch on, per positional argument, or something finer: a tensor's
    dtype and its address mod 16 (Triton: divisible by 16 or not), an int's value (Triton: equal
    to 1, divisible by 16, 32 or 64 bits), a float's type (Triton never specializes on its value)."""
    return [a if (kind := a.__class__) is int or kind is bool or a is None
            else float if kind is float
            else (a.dtype, a.data_ptr() & 15)  # a tensor (or Parameter)
            for a in args]


def launch(kernel, grid: Tuple[int, ...], params: dict, *args):
    """``kernel[grid](*args, **params)``, with what Triton compiled for it remembered.

    ``JITFunction.run`` binds and specializes every argument, builds a cache-key string and
    launch metadata on every call: tens of microseconds of host time per launch, more than the
    GPU time of the official shapes' kernels (bench/ROOFLINE.md). The first launch of a
    specialization goes through it and returns the CompiledKernel; later launches with the same
    specialization (:func:`_argument_key`, finer than Triton's own) call that kernel's launcher
    directly, with the arguments in signature order, on the current device's current stream (a
    CUDA graph's capture stream included), as ``JITFunction.run`` itself would.

    `params` are the constexpr values and ``num_warps``/``num_stages``; launchers pass one dict
    per configuration (memoized, or :func:`interned_params`), as its identity is part of the key.
    Triton's own path is taken under the interpreter, with :data:`launch_cache_enabled` off,
    while a launch hook is registered (profilers: the hook needs the metadata only Triton's path
    builds), for a kernel with pre-run hooks, and for anything that is not a plain JITFunction (a
    wrapper, such as the tests' launch counters, sees every launch). Process-wide Triton settings
    (``TRITON_DEBUG``, ``knobs``) count as they were at a specialization's first launch.
    Returns the CompiledKernel (None under the interpreter).
    """
    if not _cache_applies(kernel):
        return kernel[grid](*args, **params)
    return _launch_cached(kernel, grid, params, args)[0]


def _cache_applies(kernel) -> bool:
    """Whether a launch of `kernel` may go through the cache (launch's docstring says when not)."""
    runtime = knobs.runtime
    return not (interpreting() or not launch_cache_enabled or not isinstance(kernel, JITFunction)
                or kernel.pre_run_hooks or runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


def _launch_cached(kernel, grid: Tuple[int, ...], params: dict, args: tuple):
    """launch() where the cache applies: (the CompiledKernel, its cache entry, None where the
    launch could not be remembered, and the device it is for)."""
    active = driver.active
    device = active.get_current_device()
    # the kernel by id (a JITFunction hashes through a locked property); the entry holds it
    key = (id(kernel), id(params), device, *_argument_key(args))
    cached = _CACHED.get(key)
    if cached is None:
        compiled = kernel[grid](*args, **params)
        return compiled, _remember(key, kernel, params, args, compiled), device
    _start(cached, grid, active.get_current_stream(device), args)
    return cached.compiled, cached, device


def _start(cached: "_CachedLaunch", grid: Tuple[int, ...], stream, args: tuple) -> None:
    """The compiled kernel's own launcher, with the arguments as JITFunction.run passes them."""
    compiled = cached.compiled
    n = len(grid)
    cached.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
               compiled.function, compiled.packed_metadata, None, None, None, *args, *cached.constexpr_tail)


class PlannedLaunch:
    """One kernel launch of a launch plan, started with ``planned(kernel, aligned, *args)``.

    A plan fixes the grid, the params, every argument that is not a tensor, and the dtypes of
    the tensors (its key holds them). Of what Triton specializes a launch on, only the tensors'
    addresses can then differ between calls, and the caller says in `aligned` whether every tensor
    argument sits at an address divisible by 16 (what PyTorch's allocators hand out). An aligned
    launch then starts the compiled kernel remembered here from the first aligned launch of the
    same kernel on the same current device, without :func:`launch`'s per-argument key (a Python
    pass over every argument on every launch). Anything else, and whatever :func:`launch` would
    not cache, goes through :func:`launch`.
    """
    __slots__ = ("grid", "params", "scalars", "_aligned_entry", "_aligned_device", "_aligned_generation")

    def __init__(self, grid: Tuple[int, ...], params: dict, scalars: tuple):
        self.grid, self.params = grid, params
        self.scalars = scalars  # the plan's integer and float arguments, for the caller to pass
        # the cache entry of the first aligned launch, its device, and the cache's generation then
        # (clear_launch_cache forgets it here too: a recording driver's kernels must not outlive it)
        self._aligned_entry = self._aligned_device = self._aligned_generation = None

    def __call__(self, kernel, aligned: bool, *args):
        if not _cache_applies(kernel):
            return kernel[self.grid](*args, **self.params)
        entry = self._aligned_entry
        if aligned and entry is not None and entry.kernel is kernel and self._aligned_generation == _generation:
            active = driver.active
            device = active.get_current_device()
            if device == self._aligned_device:
                _start(entry, self.grid, active.get_current_stream(device), args)
                return entry.compiled
        compiled, entry, device = _launch_cached(kernel, self.grid, self.params, args)
        if aligned and entry is not None:
            self._aligned_entry, self._aligned_device, self._aligned_generation = entry, device, _generation
        return compiled


_INTERNED_PARAMS: dict = {}


def interned_params(**params) -> dict:
    """One dict per distinct set of launch keywords, for launchers that build them per call
    (:func:`launch` keys its cache on the dict's identity)."""
    key = tuple(params.items())
    interned = _INTERNED_PARAMS.get(key)
    if interned is None:
        interned = _INTERNED_PARAMS[key] = params
    return interned


def _remember(key: tuple, kernel, params: dict, args: tuple, compiled) -> Optional["_CachedLaunch"]:
    """Caches what JITFunction.run just compiled and launched for `key`, when the positional
    arguments and `params` cover the signature exactly (else every launch stays on Triton's path);
    returns the entry, or None."""
    if compiled is None:  # nothing compiled (Triton's warm-up/async modes)
        return None
    names = kernel.arg_names[len(args):]
    if any(name not in params for name in names):
        return None  # a defaulted argument: its value is Triton's to bind
    if len(_CACHED) >= LAUNCH_CACHE_ENTRIES:
        _CACHED.clear()
    entry = _CACHED[key] = _CachedLaunch(kernel, params, compiled, compiled.run, tuple(params[name] for name in names))
    return entry


def cached_launches() -> int:
    """How many specializations :func:`launch` holds compiled kernels for."""
    return len(_CACHED)


@contextlib.contextmanager
def tritons_own_launch_path() -> Iterator[None]:
    """Inside the block every launch goes through JITFunction.run (the cache is kept, not used):
    to compare the two paths."""
    global launch_cache_enabled
    saved = launch_cache_enabled
    launch_cache_enabled = False
    try:
        yield
    finally:
        launch_cache_enabled = saved


def clear_launch_cache() -> None:
    """Forgets every cached compiled kernel, the ones PlannedLaunch remembers included (their next
    launches go through Triton's path again)."""
    global _generation
    _CACHED.clear()
    _generation += 1
