"""What this process's Triton runs on: the one reading of TRITON_INTERPRET.

Needs nothing but the standard library, so the library's dispatch can ask it whether or not Triton
imports here. The interpreter's numerical workarounds live in _launch.dot_dtype and _launch.store_dtype.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton's interpreter is on (TRITON_INTERPRET set to anything but "" or "0"): kernels
    then run on CPU tensors, one program at a time, and CUDA tensors cannot take them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
