"""What this process's Triton can run on: whether Triton imports, whether its interpreter is on,
and the compute capability of a CUDA device.

The one guarded import of Triton and the one reading of TRITON_INTERPRET (at import). Nothing here needs
Triton, so the library's dispatch and op modules import it whether or not Triton is installed and
import the kernel files only when :data:`TRITON_IMPORT_ERROR` is None. The interpreter's numerical
workarounds live in _launch.dot_dtype and _launch.store_dtype.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the install; tests/test_dispatch.py blocks it
    #: why the Triton kernels cannot exist in this process, or None when they can
    TRITON_IMPORT_ERROR: Optional[str] = f"triton cannot be imported ({type(exc).__name__}: {exc})"
else:
    TRITON_IMPORT_ERROR = None


#: Whether Triton's interpreter is on (TRITON_INTERPRET set to anything but "" or "0"), read once,
#: when the library is imported: @triton.jit decides then, for good, whether a kernel is compiled
#: or interpreted, so a later change of the variable would not change what the kernels are
#: (and the op layer asks on every call, where an environment read is microseconds).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: on CPU tensors, one program at a time;
    CUDA tensors cannot take them."""
    return INTERPRETING


_CAPABILITY: dict = {}


def device_capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device, asked of the driver once per device: the op layer needs it
    on every call (dispatch, tile choice), and each torch.cuda query is microseconds of host time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _CAPABILITY.get(index)
    if capability is None:
        capability = _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return capability
