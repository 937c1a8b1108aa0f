"""Small helpers shared by the kernel launchers (no math lives here)."""
from __future__ import annotations

import torch
import triton.language as tl

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
