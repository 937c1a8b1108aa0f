"""What this process's Triton can run on: whether Triton imports, whether its interpreter is on,
and the compute capability of a CUDA device.

The one guarded import of Triton and the one reading of TRITON_INTERPRET (at import). Nothing here needs
Triton, so the library's dispatch and op modules import it whether or not Triton is installed and
import the kernel files only when :data:`TRITON_IMPORT_ERROR` is None. The interpreter's numerical
workarounds live in host.dot_dtype and host.store_dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    from triton import knobs
except Exception as exc:  # pragma: no cover - depends on the install; tests/test_dispatch.py blocks it
    #: why the Triton kernels cannot exist in this process, or None when it can
    TRITON_IMPORT_ERROR: Optional[str] = f"triton cannot be imported ({type(exc).__name__}: {exc})"
    #: Whether Triton's interpreter is on (never without Triton)
    INTERPRETING = False
else:
    TRITON_IMPORT_ERROR = None
    #: Whether Triton's interpreter is on, as Triton itself reads TRITON_INTERPRET (its knob: "1",
    #: "true", "on", "yes" turn it on; "0", "false", "off", "no", "" leave it off). Read once, when
    #: the library is imported: @triton.jit decides then, for good, whether a kernel is compiled or
    #: interpreted, so a later change of the variable would not change what the kernels are.
    INTERPRETING = bool(knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: on CPU tensors, one program at a time;
    CUDA tensors cannot take them."""
    return INTERPRETING


def device_capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device (the current one when the device has no index)."""
    return tuple(torch.cuda.get_device_capability(device.index if device.index is not None
                                                  else torch.cuda.current_device()))
