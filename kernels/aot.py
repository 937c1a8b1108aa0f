"""Ahead-of-time builds: one way, for both ops, to describe a kernel configuration to
``triton.compile(ASTSource(...))``.

Each op lists the configurations its launchers can choose (its ``aot_configs()``); each entry
is made by :func:`aot_config`, whose signature comes from the kernel's own argument names, so a
kernel's arguments are spelled once, in its definition. bench/aot_report.py compiles every entry
for sm_75/80/90 (tests/test_aot.py) and profiles their SASS.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch

from .host import SIG_DTYPE

#: GPU generations every configuration is built for unless it names its own
ARCHS = (75, 80, 90)


def signature(kernel, constexprs: Mapping[str, object], pointers: Mapping[str, torch.dtype],
              float_scalars: Iterable[str] = ()) -> Dict[str, str]:
    """triton.compile's signature of `kernel`, in its argument order: "constexpr" for the names in
    `constexprs`, ``*<dtype>`` for the pointer arguments (`pointers` maps each to the dtype it
    points to), "fp32" for `float_scalars`, "i32" for every other (integer) argument. A pointer
    argument (named ``*_ptr``) missing from `pointers` is an error, not a guess."""
    floats = set(float_scalars)
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + SIG_DTYPE[pointers[name]]
        elif name.endswith("_ptr"):
            raise KeyError(f"{name} of {kernel.__name__}: no pointer dtype given")
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def aot_config(name: str, kernel, constexprs: Mapping[str, object], pointers: Mapping[str, torch.dtype],
               num_warps: int, num_stages: int, float_scalars: Iterable[str] = (),
               divisible_by_16: Iterable[str] = (), archs: Iterable[int] = ARCHS, **extra) -> dict:
    """One configuration as bench/aot_report.py compiles it: the kernel, its signature and
    constexprs, the launch options, the generations it serves, and the integer arguments the JIT
    marks divisible by 16 at the shapes that matter (its compile then matches the GPU's)."""
    return dict(name=name, fn=kernel, signature=signature(kernel, constexprs, pointers, float_scalars),
                constexprs=dict(constexprs), num_warps=num_warps, num_stages=num_stages, archs=tuple(archs),
                divisible_by_16=tuple(divisible_by_16), **extra)
