"""Host-side helpers shared by the launchers of both ops: grid arithmetic, the dtypes a kernel
computes and stores in, device properties and the operand checks every launcher makes. No math
of the layers lives here."""
from __future__ import annotations

from typing import Optional

import torch
import triton.language as tl

from ._environment import interpreting

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
#: signature strings for ahead-of-time compilation (triton.compile with ASTSource)
SIG_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int8: "i8"}


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (persistent kernels size their grid by it); 1
    elsewhere: the interpreter runs programs one at a time."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids, in plain integer arithmetic (triton.cdiv is a constexpr
    function object)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
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
    see attention_device.dot_operand, so the interpreter's numerics follow the GPU's.)
    """
    first = operand_dtypes[0]
    if first in (torch.bfloat16, torch.float16) and all(d == first for d in operand_dtypes):
        if first == torch.bfloat16 and (interpreting() or device.type != "cuda"):
            return torch.float32
        return first
    return torch.float32


#: tl.dot's input_precision in the patch embedding's kernels: IEEE fp32 dots (no TF32); Triton
#: ignores it for half-precision operands
PATCH_INPUT_PRECISION = "ieee"


def store_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes before the launcher's final cast.

    Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest even, even with
    fp_downcast_rounding="rtne"; a GPU rounds correctly. So under the
    interpreter, bf16 results are written in fp32 and rounded by torch.
    """
    if out_dtype == torch.bfloat16 and interpreting():
        return torch.float32
    return out_dtype


def require_unit_last_stride(**operands: torch.Tensor) -> None:
    for name, t in operands.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last axis, got strides {t.stride()}")


def seed_tensor(seed: Optional[torch.Tensor], dropout_p: float, device: torch.device) -> torch.Tensor:
    """The [1] int64 dropout seed a kernel reads on the device; without dropout any value will do."""
    if seed is None:
        if dropout_p > 0.0:
            raise ValueError("dropout_p > 0 needs a seed tensor ([1] int64 on the device)")
        return torch.zeros((1,), dtype=torch.int64, device=device)
    return seed
