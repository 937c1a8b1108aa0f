"""The @triton.jit helpers the reprogramming attention kernels share (forward, both backward
passes, the prototype side, the dropout-mask debug kernel), and the host's side of their
contracts: the operand layout they read (check_operands). Every kernel that uses a helper gets an
element the same value from it whatever the kernel's tiles: that is what lets the backward
regenerate the forward's probabilities and dropout mask instead of storing them.

Dropout (training) uses Triton's counter-based Philox generator. Each element (r, h, s) of the
virtual [R, H, S] probability matrix gets

    key     = seed + 2**32 · (h + H · (r // rows_per_group))
    counter = (r mod rows_per_group) · S + s

`rows_per_group` (attention_tiles.rows_per_philox_group) is a multiple of 128 chosen on the host
so that every counter fits in int32 (``rows_per_group · S < 2**31``); any row block of at most 128
rows aligned to its size lies in one group, so the key is a scalar per block. Distinct (seed, h,
group) give distinct Philox keys and distinct (r, s) inside a group distinct counters: every
element draws its own number whatever the tiling, which is what lets kernels with different
tilings agree on the mask. An element is kept when its uniform draw is >= dropout_p, with
probability 1 - dropout_p.

Exponentials: MUFU.EX2 by default; a configuration may compute POLY_EIGHTHS eighths of them as a
polynomial on the FMA units (exp2_poly), chosen per group of POLY_GROUP prototypes so that every
kernel gives an element the same exponential. The forward may skip rescales below a threshold
(RESCALE_THRESHOLD). The tiles module has each configuration's values and bench/ROOFLINE.md the
reasoning.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tiles import PROTOTYPE_ALIGN
from .host import require_unit_last_stride

LOG2E = 1.4426950408889634
#: mc's strides reach the kernels in units of PROTOTYPE_ALIGN elements, multiplied back by this
#: constant: the compiler then knows every row of mc starts 16-byte aligned and loads it 16 bytes at
#: a time (the JIT marks only multiples of 16 as aligned, and S = 1000 is not one)
MC_ALIGN = tl.constexpr(PROTOTYPE_ALIGN)


@triton.jit
def dot_operand(x, DOT_DTYPE: tl.constexpr, ROUND_TO_BF16: tl.constexpr):
    """x cast for tl.dot. ROUND_TO_BF16 is set by the launcher under the interpreter only, which
    runs bf16 dots on fp32 operands (host.dot_dtype): x is first rounded to the bf16
    value a GPU's bf16 MMA operand would hold, so the CPU tests see the GPU's rounding. Rounding is
    to nearest-even on the bits, because the interpreter's own fp32 -> bf16 cast truncates."""
    if ROUND_TO_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x == x, rounded, x).to(DOT_DTYPE)  # NaN stays NaN (the bit trick can make it inf)
    return x.to(DOT_DTYPE)


@triton.jit
def load_rows(ptr, offs_r, r_mask, cols, col_mask, stride_r, DOT_DTYPE: tl.constexpr):
    """[len(offs_r), len(cols)] tile of a row-major operand (0 outside the masks), in DOT_DTYPE."""
    ptrs = ptr + offs_r.to(tl.int64)[:, None] * stride_r + cols[None, :]
    return tl.load(ptrs, mask=r_mask[:, None] & col_mask[None, :], other=0.0).to(DOT_DTYPE)


@triton.jit
def load_protos(mc_head, v_head, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask, D, stride_mc_d, stride_v_s,
                has_bias, MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One head's prototypes offs_s: (y_t: [BLOCK_D, BLOCK_S] and v: [BLOCK_S, BLOCK_E] in DOT_DTYPE,
    bias: [BLOCK_S] fp32, zeros without one). MASKED: the block runs past S."""
    y_ptrs = mc_head + offs_d[:, None] * stride_mc_d + offs_s[None, :]
    v_ptrs = v_head + offs_s[:, None] * stride_v_s + offs_e[None, :]
    # the flag broadcast to a tensor first: the interpreter cannot mask with a scalar bool
    bias_mask = (offs_s * 0 + has_bias) != 0
    if MASKED:
        y_t = tl.load(y_ptrs, mask=d_mask[:, None] & s_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=s_mask[:, None] & e_mask[None, :], other=0.0)
        bias = tl.load(mc_head + D * stride_mc_d + offs_s, mask=bias_mask & s_mask, other=0.0)
    else:
        y_t = tl.load(y_ptrs, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=e_mask[None, :], other=0.0)
        bias = tl.load(mc_head + D * stride_mc_d + offs_s, mask=bias_mask, other=0.0)
    return y_t.to(DOT_DTYPE), v.to(DOT_DTYPE), bias.to(tl.float32)


@triton.jit
def dropout_keep(seed, head, H, block_row_start, rows_per_group, rows, protos, S, dropout_p):
    """Keep mask (True = kept) for the elements (rows, protos); the two broadcast against each other.

    The (key, counter) scheme is documented at the top of this module; `block_row_start` must be
    the first row of a block that does not cross a multiple of `rows_per_group`.
    """
    group = block_row_start // rows_per_group
    key = seed.to(tl.uint64) + ((head + H * group).to(tl.uint64) << 32)
    counter = (rows - group * rows_per_group) * S + protos
    return tl.rand(key, counter) >= dropout_p


#: 2^f on [-1/2, 1/2], the minimax (relative error) cubic with p(0) = 1: max relative error 1.02e-4,
#: 38x below the bf16 rounding (2^-8) that P gets anyway as an MMA operand
_EXP2_C1 = tl.constexpr(0.6932828857276646)
_EXP2_C2 = tl.constexpr(0.2422102431806135)
_EXP2_C3 = tl.constexpr(0.05500858446972155)
#: 1.5 · 2^23: adding it rounds an fp32 |x| < 2^22 to an integer held in the low mantissa bits
_ROUND_MAGIC = tl.constexpr(12582912.0)
#: prototypes per group of the exponential's split: an element of prototype s takes the polynomial
#: iff (s // POLY_GROUP) % 8 < POLY_EIGHTHS. Every BLOCK_S divides it, so a block lies in one group
#: and the forward and both backward kernels give an element the same exponential whatever their tiles.
POLY_GROUP = tl.constexpr(128)


@triton.jit
def exp2_poly(x):
    """2^x on the FMA units instead of the special-function units (MUFU.EX2), which do 16 exponentials
    per clock per SM against 128 FMAs. For the softmax's arguments: x <= 0, or up to the forward's
    rescale threshold (x < 127 in all). x = n + f with n = round(x) (the magic-number add: no F2I,
    which would run on the same slow pipe), 2^f by a cubic in Horner form, n added into the exponent
    bits. x is clamped at -127, where the result is exactly +0.0 (so a masked -inf gives 0); between
    -127 and -126, where 2^x is below the smallest normal fp32, the result is off by less than 2^-125
    absolute. Relative error elsewhere <= 1.02e-4 (tests/test_reprogramming.py)."""
    x = tl.maximum(x, -127.0)
    rounded = x + _ROUND_MAGIC
    f = x - (rounded - _ROUND_MAGIC)  # [-1/2, 1/2]
    p = 1.0 + f * (_EXP2_C1 + f * (_EXP2_C2 + f * _EXP2_C3))
    # the low bits of `rounded` hold n (two's complement, mod 2^9): shifted into the exponent field
    bits = p.to(tl.int32, bitcast=True) + (rounded.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def softmax_exp2(x, proto_start, POLY_EIGHTHS: tl.constexpr):
    """2^x of a block of softmax arguments whose prototypes start at proto_start: by the polynomial
    for POLY_EIGHTHS of every 8 prototype groups, by MUFU.EX2 for the rest. 0 and 8 leave no branch."""
    if POLY_EIGHTHS == 0:
        return tl.exp2(x)
    elif POLY_EIGHTHS == 8:
        return exp2_poly(x)
    else:
        if ((proto_start // POLY_GROUP) % 8) < POLY_EIGHTHS:
            p = exp2_poly(x)
        else:
            p = tl.exp2(x)
        return p


def check_operands(x: torch.Tensor, mc: torch.Tensor, v: torch.Tensor) -> None:
    """What the forward and backward kernels assume of x, mc and v beyond their shapes."""
    require_unit_last_stride(x=x, mc=mc, v=v)
    if mc.stride(1) % PROTOTYPE_ALIGN or mc.shape[2] < v.shape[0]:
        raise ValueError(f"mc [H, W, S'] must span the S={v.shape[0]} prototypes with a row stride that is a "
                         f"multiple of {PROTOTYPE_ALIGN}, got shape {tuple(mc.shape)} strides {mc.stride()}")
