"""Fused cross-attention of Time-LLM's reprogramming layer on factorized logits (SPEC §1.2, §1.3):
Triton kernels and their launchers.

Notation, used in every shape comment below:

* ``R = B'·L`` query rows (batch and patch axes folded: every row attends to the same prototypes),
* ``H`` heads, ``E`` the value width of a head (d_keys), ``S`` prototypes,
* ``D`` the width of the logits' dot products: d_model padded to BLOCK_D on the factorized form, E
  on the standard one.

Per head h the kernels see the logits as a thin product plus a bias:

    Z_h[r, s] = scale · (X_h[r] · Y_h[s] + c_h[s])        (natural-log units; the kernels use exp2)
    P_h       = softmax_s(Z_h)
    out[r, hE:(h+1)E] = Σ_s dropout(P_h)[r, s] · V_h[s]
    lse[h, r] = log2 Σ_s 2^(log2(e)·Z_h[r, s])

* factorized form (d_model <= E: every Time-LLM shape): X_h = target for every head, Y_h = K_h·Wq_h
  ([S, d_model]), c_h = K_h·bq_h, scale = 1/sqrt(E). X_h·Y_hᵀ + c_h = Q_h·K_hᵀ exactly, so Q is never
  formed and the logit dots are d_model wide instead of E (SPEC §1.3).
* standard form (d_model > E): X_h = Q_h from a cuBLAS projection, Y_h = K_h, no bias.

The op layer (timellm_fast/reprogramming.py) builds X, Y, c and V with GEMMs; the kernels never see a
projection weight. Layouts (every tensor has unit stride along its last axis):

    x    [R, *]       head h reads columns h·x_head_stride + [0, D) (x_head_stride 0: factorized)
    mc   [H, W, S']   the prototype side, transposed: rows [0, D) hold Y_hᵀ, row D the bias c_h
                      (factorized; W = D + 1), or W = D = E rows of K_hᵀ (standard). Rows run along
                      the prototypes, so a block of them, its bias included, is read with 16-byte
                      loads: the row stride is a multiple of 8 (S' = S rounded up to 8)
    v    [S, H, E]
    out  [R, H·E]     heads merged: what the output projection reads
    lse  [H, R]       fp32, base 2

Backward, from the forward's lse and the stored output O (G = d out):

    delta[h, r] = Σ_e G·O over head h's columns    (= Σ_s P·dP; bench/ROOFLINE.md "Delta")
    dP = G_h·V_hᵀ (through the forward's dropout mask),  dZ = P ∘ (dP − delta)
    prototype side:  dV_h = dropout(P)ᵀ·G_h,  dY_h = scale·dZᵀ·X_h,  dc_h = scale·Σ_r dZ
    row side:        dX_h = scale·dZ·Y_h       (factorized: summed over heads into d target)

`attention_bwd_protos_kernel` owns a block of prototypes of one head and a chunk of rows: it forms
each (row, prototype) element's P, dP and dZ once (6·D + 4·E MMA FLOPs per element), keeps the
prototype side in registers (one fp32 partial per row chunk, summed in a fixed order) and, in the
default mode, adds the row side into dX with fp32 atomics (the order of those additions varies run
to run, as in FlashAttention's and PyTorch's own SDPA backward). Deterministic mode takes the row
side from `attention_bwd_rows_kernel` instead, a row-stationary pass that forms P, dP and dZ a second
time and reduces in a fixed order (8·D + 6·E per element in all): bitwise reproducible.

The row-stationary loops (forward, row pass) run their full prototype blocks without masks and the
last, partial block with them: in a loop bound by instruction issue, a compare and a select per
element are a tenth of the work.

Exponentials: MUFU.EX2 by default; a configuration may compute POLY_EIGHTHS eighths of them as a
polynomial on the FMA units (_exp2_poly), chosen per group of POLY_GROUP prototypes so that every
kernel gives an element the same exponential. The forward may skip rescales below a threshold
(RESCALE_THRESHOLD). The tiles module has each configuration's values and bench/ROOFLINE.md the
reasoning.

Dropout (training) uses Triton's counter-based Philox generator, so the backward kernels regenerate
the forward's mask instead of storing it. Each element (r, h, s) of the virtual [R, H, S] probability
matrix gets

    key     = seed + 2**32 · (h + H · (r // rows_per_group))
    counter = (r mod rows_per_group) · S + s

`rows_per_group` is a multiple of 128 chosen on the host so that every counter fits in int32
(``rows_per_group · S < 2**31``); any row block of at most 128 rows aligned to its size lies in one
group, so the key is a scalar per block. Distinct (seed, h, group) give distinct Philox keys and
distinct (r, s) inside a group distinct counters: every element draws its own number whatever the
tiling, which is what lets kernels with different tilings agree on the mask. An element is kept when
its uniform draw is >= dropout_p, with probability 1 - dropout_p.

Launch parameters come only from kernels/reprogramming_attention_tiles.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._environment import interpreting
from ._launch import PlannedLaunch, cdiv, launch, store_dtype
from .reprogramming_attention_tiles import (BLOCK_E_CHOICES, MAX_BLOCK_R, MAX_HEAD_DIM, MIN_HEAD_DIM,
                                            PROTOTYPE_ALIGN, AttentionConfig, arch_class, block_d_for, block_e_for,
                                            LAUNCH_PLANS, is_factorized, keys_first, launch_params, no_config_reason,
                                            override_softmax, override_tiles, select_config)
from .reprogramming_attention_tiles import aot_configs as tiles_aot_configs

#: the prototype-stationary backward splits the rows into chunks until the grid has about this many programs
PROTOS_TARGET_PROGRAMS = 512
INT32_LIMIT = 2**31 - 1
LOG2E = 1.4426950408889634
#: mc's strides reach the kernels in units of PROTOTYPE_ALIGN elements, multiplied back by this
#: constant: the compiler then knows every row of mc starts 16-byte aligned and loads it 16 bytes at
#: a time (the JIT marks only multiples of 16 as aligned, and S = 1000 is not one)
_ALIGN = tl.constexpr(PROTOTYPE_ALIGN)

__all__ = ["BLOCK_E_CHOICES", "MAX_HEAD_DIM", "MIN_HEAD_DIM", "PROTOTYPE_ALIGN", "AttentionConfig",
           "attention_forward", "attention_backward", "block_d_for", "block_e_for", "dropout_keep_mask",
           "is_factorized", "keys_first", "override_softmax", "override_tiles", "prototype_logits",
           "prototype_logits_backward", "select_config", "unsupported_reason"]


# ---------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot_operand(x, DOT_DTYPE: tl.constexpr, ROUND_TO_BF16: tl.constexpr):
    """x cast for tl.dot. ROUND_TO_BF16 is set by the launcher under the interpreter only, which
    runs bf16 dots on fp32 operands (kernels/_launch.dot_dtype): x is first rounded to the bf16
    value a GPU's bf16 MMA operand would hold, so the CPU tests see the GPU's rounding. Rounding is
    to nearest-even on the bits, because the interpreter's own fp32 -> bf16 cast truncates."""
    if ROUND_TO_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x == x, rounded, x).to(DOT_DTYPE)  # NaN stays NaN (the bit trick can make it inf)
    return x.to(DOT_DTYPE)


@triton.jit
def _load_rows(ptr, offs_r, r_mask, cols, col_mask, stride_r, DOT_DTYPE: tl.constexpr):
    """[len(offs_r), len(cols)] tile of a row-major operand (0 outside the masks), in DOT_DTYPE."""
    ptrs = ptr + offs_r.to(tl.int64)[:, None] * stride_r + cols[None, :]
    return tl.load(ptrs, mask=r_mask[:, None] & col_mask[None, :], other=0.0).to(DOT_DTYPE)


@triton.jit
def _load_protos(mc_head, v_head, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask, D, stride_mc_d, stride_v_s,
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
def _dropout_keep(seed, head, H, block_row_start, rows_per_group, rows, protos, S, dropout_p):
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
def _exp2_poly(x):
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
def _softmax_exp2(x, proto_start, POLY_EIGHTHS: tl.constexpr):
    """2^x of a block of softmax arguments whose prototypes start at proto_start: by the polynomial
    for POLY_EIGHTHS of every 8 prototype groups, by MUFU.EX2 for the rest. 0 and 8 leave no branch."""
    if POLY_EIGHTHS == 0:
        return tl.exp2(x)
    elif POLY_EIGHTHS == 8:
        return _exp2_poly(x)
    else:
        if ((proto_start // POLY_GROUP) % 8) < POLY_EIGHTHS:
            p = _exp2_poly(x)
        else:
            p = tl.exp2(x)
        return p


@triton.jit
def _forward_block(
    acc, row_sum, row_max,  # the online softmax's state: [BLOCK_R, BLOCK_E], [BLOCK_R], [BLOCK_R] fp32
    x,  # [BLOCK_R, BLOCK_D] in DOT_DTYPE
    proto_start, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask,
    S, D, H, stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group, dropout_p,
    BLOCK_S: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    POLY_EIGHTHS: tl.constexpr, RESCALE_THRESHOLD: tl.constexpr, ROUND_TO_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of prototypes of the forward's online softmax: returns the updated (acc, row_sum, row_max).

    row_max is the reference maximum the running sums are scaled to. With RESCALE_THRESHOLD > 0 it
    moves only when a row's maximum exceeds it by more than the threshold, so most blocks skip the
    rescale: P·2^(m - ref) <= 2^RESCALE_THRESHOLD stays bounded (row_sum <= S·2^threshold; at 8, a P
    operand of at most 256 is exact in bf16 and fp16), and the result is exact because the final
    normalization and lse use the same reference."""
    offs_s = proto_start + tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    y_t, v, bias = _load_protos(mc_head, v_head, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask, D, stride_mc_d,
                                stride_v_s, has_bias, MASKED, DOT_DTYPE)
    # base-2 logits; bias·scale is one multiply per prototype, the rest one FMA per element
    logits = tl.dot(x, y_t, input_precision=INPUT_PRECISION) * qk_scale + (bias * qk_scale)[None, :]
    if MASKED:
        logits = tl.where(s_mask[None, :], logits, float("-inf"))
    block_max = tl.max(logits, axis=1)
    if RESCALE_THRESHOLD == 0:
        new_max = tl.maximum(row_max, block_max)
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale
        acc = acc * rescale[:, None]
    else:
        new_max = tl.where(block_max > row_max + RESCALE_THRESHOLD, block_max, row_max)
        if tl.max((new_max != row_max).to(tl.int32), axis=0) > 0:  # one branch for the whole block
            rescale = tl.exp2(row_max - new_max)
            row_sum = row_sum * rescale
            acc = acc * rescale[:, None]
    probs = _softmax_exp2(logits - new_max[:, None], proto_start, POLY_EIGHTHS)
    # the softmax normalizer counts every prototype; dropout acts on the normalized probabilities
    row_sum = row_sum + tl.sum(probs, axis=1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S,
                             dropout_p)
        probs = tl.where(keep, probs, 0.0)
    acc = tl.dot(_dot_operand(probs, DOT_DTYPE, ROUND_TO_BF16), v, acc, input_precision=INPUT_PRECISION)
    return acc, row_sum, new_max


@triton.jit
def _row_block(
    dx,  # the row side's accumulator: [BLOCK_R, BLOCK_D] fp32
    x, grad, lse, delta,  # [BLOCK_R, BLOCK_D], [BLOCK_R, BLOCK_E] in DOT_DTYPE; [BLOCK_R], [BLOCK_R] fp32
    proto_start, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask,
    S, D, H, stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group, dropout_p,
    keep_scale,
    BLOCK_S: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, POLY_EIGHTHS: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr, MASKED: tl.constexpr,
):
    """One block of prototypes of the row-stationary backward: returns dx + dZ·Y_h over the block."""
    offs_s = proto_start + tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    y_t, v, bias = _load_protos(mc_head, v_head, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask, D, stride_mc_d,
                                stride_v_s, has_bias, MASKED, DOT_DTYPE)
    logits = tl.dot(x, y_t, input_precision=INPUT_PRECISION) * qk_scale + (bias * qk_scale)[None, :]
    probs = _softmax_exp2(logits - lse[:, None], proto_start, POLY_EIGHTHS)
    if MASKED:
        probs = tl.where(s_mask[None, :], probs, 0.0)
    dprobs = tl.dot(grad, tl.trans(v), input_precision=INPUT_PRECISION)
    if dropout_p > 0.0:
        keep = _dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S,
                             dropout_p)
        dprobs = tl.where(keep, dprobs * keep_scale, 0.0)
    dlogits = probs * (dprobs - delta[:, None])
    return tl.dot(_dot_operand(dlogits, DOT_DTYPE, ROUND_TO_BF16), tl.trans(y_t), dx, input_precision=INPUT_PRECISION)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["has_bias"])
def attention_fwd_kernel(
    x_ptr,  # x: [R, *], head h's logit operand at columns h*x_head_stride + [0, D)
    mc_ptr,  # mc: [H, W, S'] (strides stride_mc_h8·8, stride_mc_d8·8, 1): Y_hᵀ in rows [0, D), c_h in row D
    v_ptr,  # v: [S, H, E] (strides stride_v_s, stride_v_h, 1)
    out_ptr,  # out: [R, H*E], written here (heads merged)
    lse_ptr,  # lse: [H, R] fp32, written here: base-2 log-sum-exp of the logits
    R, S, D, H, E,
    stride_x_r, x_head_stride, stride_mc_h8, stride_mc_d8, stride_v_s, stride_v_h,
    has_bias,  # 1: factorized form, c_h in row D of mc; 0: standard form
    qk_scale,  # log2(e) · scale: logits in base-2 units
    dropout_p,
    seed_ptr,  # seed: [1] int64 on the device (a device draw: CUDA-graph replays draw anew)
    rows_per_group,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    POLY_EIGHTHS: tl.constexpr,  # share of the exponentials on the FMA units (_softmax_exp2), in eighths
    RESCALE_THRESHOLD: tl.constexpr,  # base-2: rescale only when a row's maximum grows by more (0: always)
    ROUND_TO_BF16: tl.constexpr,
):
    row_start = tl.program_id(0) * BLOCK_R
    head = tl.program_id(1)
    offs_r = row_start + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    r_mask = offs_r < R
    d_mask = offs_d < D
    e_mask = offs_e < E
    stride_mc_h, stride_mc_d = stride_mc_h8 * _ALIGN, stride_mc_d8 * _ALIGN  # 16-byte aligned rows
    x = _load_rows(x_ptr, offs_r, r_mask, head * x_head_stride + offs_d, d_mask, stride_x_r, DOT_DTYPE)
    mc_head = mc_ptr + head * stride_mc_h
    v_head = v_ptr + head * stride_v_h
    seed = tl.load(seed_ptr)

    row_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    full_end = (S // BLOCK_S) * BLOCK_S
    for proto_start in range(0, full_end, BLOCK_S):
        acc, row_sum, row_max = _forward_block(
            acc, row_sum, row_max, x, proto_start, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask, S, D, H,
            stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group, dropout_p,
            BLOCK_S, DOT_DTYPE, INPUT_PRECISION, HAS_DROPOUT, POLY_EIGHTHS, RESCALE_THRESHOLD, ROUND_TO_BF16, False)
    if full_end < S:
        acc, row_sum, row_max = _forward_block(
            acc, row_sum, row_max, x, full_end, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask, S, D, H,
            stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group, dropout_p,
            BLOCK_S, DOT_DTYPE, INPUT_PRECISION, HAS_DROPOUT, POLY_EIGHTHS, RESCALE_THRESHOLD, ROUND_TO_BF16, True)

    out = acc / row_sum[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    out_ptrs = out_ptr + offs_r.to(tl.int64)[:, None] * (H * E) + (head * E + offs_e)[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & e_mask[None, :])
    tl.store(lse_ptr + head * R + offs_r, row_max + tl.log2(row_sum), mask=r_mask)


@triton.jit(do_not_specialize=["zero_dx"])
def attention_bwd_delta_kernel(
    out_ptr,  # out: [R, H*E], the forward's output
    grad_ptr,  # grad: [R, H*E], its gradient
    delta_ptr,  # delta: [H, R] fp32, written here
    dx_ptr,  # dx: [R, DX_COLS] fp32, zeroed here when zero_dx (the atomic row side adds into it)
    R, H, E, DX_COLS, zero_dx,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """delta[h, r] = Σ_e grad·out over head h's columns. Equal to Σ_s P·dP in exact arithmetic
    (the forward's out is Σ_s dropout(P)·V), with no pass over the prototypes."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    row_offsets = offs_r.to(tl.int64)[:, None] * (H * E)
    for head in range(0, H):
        delta = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for e_start in range(0, E, BLOCK_E):  # BLOCK_E: a chunk of the head's columns
            offs_e = e_start + tl.arange(0, BLOCK_E)
            cols = row_offsets + (head * E + offs_e)[None, :]
            mask = r_mask[:, None] & (offs_e < E)[None, :]
            o = tl.load(out_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            delta += tl.sum(o * g, axis=1)
        tl.store(delta_ptr + head * R + offs_r, delta, mask=r_mask)
    if zero_dx != 0:
        offs_x = tl.arange(0, BLOCK_X)
        zeros = tl.zeros((BLOCK_R, BLOCK_X), dtype=tl.float32)
        for col_start in range(0, DX_COLS, BLOCK_X):
            cols = col_start + offs_x
            tl.store(dx_ptr + offs_r.to(tl.int64)[:, None] * DX_COLS + cols[None, :], zeros,
                     mask=r_mask[:, None] & (cols < DX_COLS)[None, :])


@triton.jit(do_not_specialize=["has_bias", "with_dx"])
def attention_bwd_protos_kernel(
    x_ptr,  # x: [R, *] as in the forward
    mc_ptr,  # mc: [H, W, S'] as in the forward
    v_ptr,  # v: [S, H, E] as in the forward
    grad_ptr,  # grad: [R, H*E], gradient of the forward's out
    lse_ptr,  # lse: [H, R] fp32, the forward's
    delta_ptr,  # delta: [H, R] fp32, attention_bwd_delta_kernel's
    dmc_ptr,  # dmc: [n_chunks, H, W, S'] fp32 (dense), written here: dYᵀ and dc of each row chunk
    dv_ptr,  # dv: [n_chunks, S, H, E] fp32 (dense), written here
    dx_ptr,  # dx: [R, *] fp32 with x's columns, added to atomically when with_dx
    R, S, D, H, E, W, S_PAD,
    stride_x_r, x_head_stride, stride_mc_h8, stride_mc_d8, stride_v_s, stride_v_h, stride_dx_r,
    rows_per_chunk,  # a multiple of BLOCK_R
    has_bias,  # as in the forward
    qk_scale,  # log2(e) · scale
    grad_scale,  # scale: the logits' factor, applied to dY, dc and dX
    with_dx,  # 1: add the row side into dx (default mode); 0: leave it to attention_bwd_rows_kernel
    dropout_p,  # a run-time value: one build serves training with and without dropout
    seed_ptr,  # seed: [1] int64 on the device, the forward's
    rows_per_group,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    POLY_EIGHTHS: tl.constexpr,  # as in the forward: an element gets the forward's exponential
    ROUND_TO_BF16: tl.constexpr,
):
    proto_start = tl.program_id(0) * BLOCK_S
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    offs_s = proto_start + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    s_mask = offs_s < S
    d_mask = offs_d < D
    e_mask = offs_e < E
    stride_mc_h, stride_mc_d = stride_mc_h8 * _ALIGN, stride_mc_d8 * _ALIGN
    mc_head = mc_ptr + head * stride_mc_h
    y_t, v, bias = _load_protos(mc_head, v_ptr + head * stride_v_h, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask,
                                D, stride_mc_d, stride_v_s, has_bias, True, DOT_DTYPE)
    y = tl.trans(y_t)  # [BLOCK_S, BLOCK_D]
    bias = bias * qk_scale
    seed = tl.load(seed_ptr)
    keep_scale = 1.0 / (1.0 - dropout_p)

    dy = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    dc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    x_cols = head * x_head_stride + offs_d
    chunk_start = chunk * rows_per_chunk
    chunk_end = tl.minimum(chunk_start + rows_per_chunk, R)
    for row_start in range(chunk_start, chunk_end, BLOCK_R):
        offs_r = row_start + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        x = _load_rows(x_ptr, offs_r, r_mask, x_cols, d_mask, stride_x_r, DOT_DTYPE)  # [BLOCK_R, BLOCK_D]
        grad = _load_rows(grad_ptr, offs_r, r_mask, head * E + offs_e, e_mask, H * E, DOT_DTYPE)  # [BLOCK_R, BLOCK_E]
        lse = tl.load(lse_ptr + head * R + offs_r, mask=r_mask, other=0.0)
        delta = tl.load(delta_ptr + head * R + offs_r, mask=r_mask, other=0.0)

        # transposed orientation [BLOCK_S, BLOCK_R]: the prototype side reduces over rows
        logits_t = tl.dot(y, tl.trans(x), input_precision=INPUT_PRECISION) * qk_scale + bias[:, None]
        # padded rows and prototypes must give P = 0: exp2(logit - 0) there can overflow to inf,
        # and inf · 0 is NaN
        probs_t = _softmax_exp2(logits_t - lse[None, :], proto_start, POLY_EIGHTHS)
        probs_t = tl.where(s_mask[:, None] & r_mask[None, :], probs_t, 0.0)
        dprobs_t = tl.dot(v, tl.trans(grad), input_precision=INPUT_PRECISION)  # [BLOCK_S, BLOCK_R]
        if dropout_p > 0.0:
            keep_t = _dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[None, :], offs_s[:, None], S,
                                   dropout_p)
            attn_t = tl.where(keep_t, probs_t * keep_scale, 0.0)
            dprobs_t = tl.where(keep_t, dprobs_t * keep_scale, 0.0)
        else:
            attn_t = probs_t
        dv = tl.dot(_dot_operand(attn_t, DOT_DTYPE, ROUND_TO_BF16), grad, dv, input_precision=INPUT_PRECISION)
        dlogits_t = probs_t * (dprobs_t - delta[None, :])
        dlogits_op = _dot_operand(dlogits_t, DOT_DTYPE, ROUND_TO_BF16)
        dy = tl.dot(dlogits_op, x, dy, input_precision=INPUT_PRECISION)
        dc += tl.sum(dlogits_t, axis=1)
        if with_dx != 0:
            dx = tl.dot(tl.trans(dlogits_op), y, input_precision=INPUT_PRECISION)  # [BLOCK_R, BLOCK_D]
            tl.atomic_add(dx_ptr + offs_r.to(tl.int64)[:, None] * stride_dx_r + x_cols[None, :], dx * grad_scale,
                          mask=r_mask[:, None] & d_mask[None, :], sem="relaxed")

    # one dense fp32 slab per row chunk, summed in a fixed order by the launcher; dY stored transposed
    # into mc's layout (the columns of a row of the slab run along the prototypes)
    slab = dmc_ptr + (chunk.to(tl.int64) * H + head) * W * S_PAD
    # the slab's alignment padding (prototypes S..S_PAD) gets zeros (dy, dc are 0 past S): it is the
    # gradient of mc's padding, which autograd sees
    pad_mask = offs_s < S_PAD
    tl.store(slab + offs_d[None, :] * S_PAD + offs_s[:, None], dy * grad_scale,
             mask=pad_mask[:, None] & d_mask[None, :])
    tl.store(slab + D * S_PAD + offs_s, dc * grad_scale, mask=pad_mask & ((offs_s * 0 + has_bias) != 0))
    dv_rows = (chunk.to(tl.int64) * S + offs_s) * H + head  # [BLOCK_S] row of (chunk, s, head)
    tl.store(dv_ptr + dv_rows[:, None] * E + offs_e[None, :], dv, mask=s_mask[:, None] & e_mask[None, :])


@triton.jit(do_not_specialize=["has_bias"])
def attention_bwd_rows_kernel(
    x_ptr,  # x: [R, *] as in the forward
    mc_ptr,  # mc: [H, W, S'] as in the forward
    v_ptr,  # v: [S, H, E] as in the forward
    grad_ptr,  # grad: [R, H*E], gradient of the forward's out
    lse_ptr,  # lse: [H, R] fp32, the forward's
    delta_ptr,  # delta: [H, R] fp32, attention_bwd_delta_kernel's
    dx_ptr,  # dx: fp32, head h's [R, D] block at dx_ptr + h*stride_dx_h (row stride stride_dx_r), written here
    R, S, D, H, E,
    stride_x_r, x_head_stride, stride_mc_h8, stride_mc_d8, stride_v_s, stride_v_h, stride_dx_r, stride_dx_h,
    has_bias,  # as in the forward
    qk_scale,  # log2(e) · scale
    grad_scale,  # scale
    dropout_p,  # a run-time value, as in attention_bwd_protos_kernel
    seed_ptr,  # seed: [1] int64 on the device, the forward's
    rows_per_group,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    POLY_EIGHTHS: tl.constexpr,  # as in the forward: an element gets the forward's exponential
    ROUND_TO_BF16: tl.constexpr,
):
    """The row side dX_h = scale·Σ_s dZ·Y_h in a fixed order (deterministic mode)."""
    row_start = tl.program_id(0) * BLOCK_R
    head = tl.program_id(1)
    offs_r = row_start + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    r_mask = offs_r < R
    d_mask = offs_d < D
    e_mask = offs_e < E
    stride_mc_h, stride_mc_d = stride_mc_h8 * _ALIGN, stride_mc_d8 * _ALIGN
    x = _load_rows(x_ptr, offs_r, r_mask, head * x_head_stride + offs_d, d_mask, stride_x_r, DOT_DTYPE)
    grad = _load_rows(grad_ptr, offs_r, r_mask, head * E + offs_e, e_mask, H * E, DOT_DTYPE)
    lse = tl.load(lse_ptr + head * R + offs_r, mask=r_mask, other=0.0)
    delta = tl.load(delta_ptr + head * R + offs_r, mask=r_mask, other=0.0)
    mc_head = mc_ptr + head * stride_mc_h
    v_head = v_ptr + head * stride_v_h
    seed = tl.load(seed_ptr)
    keep_scale = 1.0 / (1.0 - dropout_p)

    dx = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    full_end = (S // BLOCK_S) * BLOCK_S
    for proto_start in range(0, full_end, BLOCK_S):
        dx = _row_block(dx, x, grad, lse, delta, proto_start, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask,
                        S, D, H, stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group,
                        dropout_p, keep_scale, BLOCK_S, DOT_DTYPE, INPUT_PRECISION, POLY_EIGHTHS, ROUND_TO_BF16, False)
    if full_end < S:
        dx = _row_block(dx, x, grad, lse, delta, full_end, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask,
                        S, D, H, stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group,
                        dropout_p, keep_scale, BLOCK_S, DOT_DTYPE, INPUT_PRECISION, POLY_EIGHTHS, ROUND_TO_BF16, True)

    dx_ptrs = dx_ptr + head * stride_dx_h + offs_r.to(tl.int64)[:, None] * stride_dx_r + offs_d[None, :]
    tl.store(dx_ptrs, dx * grad_scale, mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def dropout_keep_mask_kernel(
    keep_ptr,  # keep: [H, R, S] int8, written here (1 = kept)
    R, S, H,
    dropout_p,
    seed_ptr,  # seed: [1] int64 on the device
    rows_per_group,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Debug/test entry: writes the mask the attention kernels draw, through the same helper."""
    seed = tl.load(seed_ptr)
    row_start = tl.program_id(0) * BLOCK_R
    head = tl.program_id(1)
    offs_r = row_start + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    for proto_start in range(0, S, BLOCK_S):
        offs_s = proto_start + tl.arange(0, BLOCK_S)
        keep = _dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S, dropout_p)
        ptrs = keep_ptr + (head * R + offs_r.to(tl.int64))[:, None] * S + offs_s[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=r_mask[:, None] & (offs_s < S)[None, :])


@triton.jit
def prototype_logits_kernel(
    wq_ptr,  # wq: [H*E, DM], the query projection's weight (unit stride along DM)
    bq_ptr,  # bq: [H*E], its bias
    k_ptr,  # k: [S, H*E], the projected keys (unit stride along H*E)
    mc_ptr,  # mc: [H, BLOCK_D + 1, S'] contiguous, written here
    wqb_ptr,  # wqb: [H*E, BLOCK_D + 1] contiguous, written here
    S, S_pad, E, DM, stride_wq, stride_k_s,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The factorized form's mc from projected keys: for head h, rows [0, BLOCK_D) of mc_h hold
    Y_hᵀ = Wq_hᵀ·K_hᵀ (zero rows past d_model), row BLOCK_D holds c_h = K_h·bq_h, and the alignment
    columns S..S' are zeros, all written in one pass (2·E·(d_model + 1) FLOPs per prototype and
    head). The same numbers as the batched GEMM of wqb_hᵀ = [Wq_h | 0 | bq_h]ᵀ by K_hᵀ, without a
    concatenation before it or a pad after it: at the small shapes each of those is a dispatcher
    call and a launch. Products of the data dtype accumulate in fp32 and are rounded once, as
    cuBLAS does. The first program of each head also writes wqb_h, the operand
    the backward multiplies by (d K_hᵀ = wqb_h·dmc_h), so nothing concatenates it either way."""
    head = tl.program_id(1)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    e_mask = offs_e < E
    rows = head * E + offs_e  # head h's rows of wq and bq, its columns of k
    k_t = tl.load(k_ptr + offs_s.to(tl.int64)[None, :] * stride_k_s + rows[:, None],
                  mask=e_mask[:, None] & (offs_s < S)[None, :], other=0.0)  # [BLOCK_E, BLOCK_S]; 0 past S
    wq_t = tl.load(wq_ptr + rows[None, :] * stride_wq + offs_d[:, None],
                   mask=(offs_d < DM)[:, None] & e_mask[None, :], other=0.0)  # [BLOCK_D, BLOCK_E]; 0 past DM
    bq = tl.load(bq_ptr + rows, mask=e_mask, other=0.0)  # [BLOCK_E]
    y_t = tl.dot(wq_t.to(DOT_DTYPE), k_t.to(DOT_DTYPE), input_precision=INPUT_PRECISION)  # [BLOCK_D, BLOCK_S] fp32
    c = tl.sum(k_t.to(tl.float32) * bq.to(tl.float32)[:, None], axis=0)  # [BLOCK_S]
    mc_head = mc_ptr + head * (BLOCK_D + 1) * S_pad
    s_mask = offs_s < S_pad
    tl.store(mc_head + offs_d[:, None] * S_pad + offs_s[None, :], y_t.to(mc_ptr.dtype.element_ty),
             mask=s_mask[None, :])
    tl.store(mc_head + BLOCK_D * S_pad + offs_s, c.to(mc_ptr.dtype.element_ty), mask=s_mask)
    if tl.program_id(0) == 0:  # wqb_h's rows, the values as they are (no rounding)
        # read again, row-major [BLOCK_E, BLOCK_D], once mc is written: storing wq_t from the dot's
        # operand layout keeps it live across the dot, which spills the fp32 build at BLOCK_E = 64
        wq_rows = tl.load(wq_ptr + rows[:, None] * stride_wq + offs_d[None, :],
                          mask=e_mask[:, None] & (offs_d < DM)[None, :], other=0.0)
        wqb_rows = wqb_ptr + rows * (BLOCK_D + 1)
        tl.store(wqb_rows[:, None] + offs_d[None, :], wq_rows, mask=e_mask[:, None])
        tl.store(wqb_rows + BLOCK_D, bq, mask=e_mask)


@triton.jit
def prototype_logits_bwd_kernel(
    dmc_ptr,  # dmc: [H, BLOCK_D + 1, S'] fp32, mc's gradient (attention_backward's)
    wqb_ptr,  # wqb: [H*E, BLOCK_D + 1], prototype_logits' (unit stride along its last axis)
    k_ptr,  # k: [S, H*E], the projected keys (unit stride along H*E)
    dkt_ptr,  # dkt: [H*E, S] contiguous, d Kᵀ, written here
    dwq_ptr,  # dwq: [H*E, DM] contiguous, Wq's gradient, written here
    dbq_ptr,  # dbq: [H*E], bq's gradient, written here
    dbk_ptr,  # dbk: [H*E], bk's gradient (Σ_s d Kᵀ), written here
    S, E, DM, stride_dmc_h, stride_dmc_w, stride_wqb, stride_k_s,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TO_BF16: tl.constexpr,
):
    """prototype_logits_kernel's backward, one program per head: from mc_h = wqb_hᵀ·K_hᵀ,
    d K_hᵀ = wqb_h·dmc_h and d wqb_h = K_hᵀ·dmc_hᵀ, whose columns [0, d_model) are d Wq_h and whose
    column BLOCK_D is d bq_h; and d bk_h = Σ_s d K_hᵀ. The program walks the prototypes once and
    sums d wqb_h and d bk_h in registers in a fixed order (no atomics: the same bits every run).
    dmc is rounded to the data dtype first, as the batched GEMMs of the same products take it."""
    head = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    e_mask = offs_e < E
    rows = head * E + offs_e  # head h's rows of wqb and d Kᵀ, its columns of k
    wqb_rows = wqb_ptr + rows[:, None] * stride_wqb
    wq_h = tl.load(wqb_rows + offs_d[None, :], mask=e_mask[:, None], other=0.0).to(DOT_DTYPE)  # [BLOCK_E, BLOCK_D]
    bq_h = tl.load(wqb_ptr + rows * stride_wqb + BLOCK_D, mask=e_mask, other=0.0).to(tl.float32)  # [BLOCK_E]
    dmc_head = dmc_ptr + head * stride_dmc_h
    dwq = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    dbq = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbk = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for s_start in range(0, S, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        s_mask = offs_s < S
        dmc_y = _dot_operand(tl.load(dmc_head + offs_d[:, None] * stride_dmc_w + offs_s[None, :],
                                     mask=s_mask[None, :], other=0.0), DOT_DTYPE, ROUND_TO_BF16)  # [BLOCK_D, BLOCK_S]
        dmc_c = _dot_operand(tl.load(dmc_head + BLOCK_D * stride_dmc_w + offs_s, mask=s_mask, other=0.0),
                             DOT_DTYPE, ROUND_TO_BF16).to(tl.float32)  # [BLOCK_S]
        k_t = tl.load(k_ptr + offs_s.to(tl.int64)[None, :] * stride_k_s + rows[:, None],
                      mask=e_mask[:, None] & s_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_S]
        dkt = tl.dot(wq_h, dmc_y, input_precision=INPUT_PRECISION) + bq_h[:, None] * dmc_c[None, :]
        tl.store(dkt_ptr + rows.to(tl.int64)[:, None] * S + offs_s[None, :], dkt.to(dkt_ptr.dtype.element_ty),
                 mask=e_mask[:, None] & s_mask[None, :])
        dbk += tl.sum(dkt, axis=1)
        dwq += tl.dot(k_t.to(DOT_DTYPE), tl.trans(dmc_y), input_precision=INPUT_PRECISION)
        dbq += tl.sum(k_t.to(tl.float32) * dmc_c[None, :], axis=1)
    tl.store(dwq_ptr + rows[:, None] * DM + offs_d[None, :], dwq.to(dwq_ptr.dtype.element_ty),
             mask=e_mask[:, None] & (offs_d < DM)[None, :])
    tl.store(dbq_ptr + rows, dbq.to(dbq_ptr.dtype.element_ty), mask=e_mask)
    tl.store(dbk_ptr + rows, dbk.to(dbk_ptr.dtype.element_ty), mask=e_mask)


#: role -> kernel, what the tile table's configurations launch
KERNELS = {
    "fwd": attention_fwd_kernel,
    "bwd_delta": attention_bwd_delta_kernel,
    "bwd_protos": attention_bwd_protos_kernel,
    "bwd_rows": attention_bwd_rows_kernel,
    "dropout_mask": dropout_keep_mask_kernel,
    "prototype_logits": prototype_logits_kernel,
    "prototype_logits_bwd": prototype_logits_bwd_kernel,
}


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def rows_per_philox_group(num_protos: int) -> int:
    """Largest multiple of MAX_BLOCK_R rows whose counters (row·S + s, padding included) fit int32."""
    rows = (INT32_LIMIT - MAX_BLOCK_R) // max(num_protos + MAX_BLOCK_R, 1)
    return (rows // MAX_BLOCK_R) * MAX_BLOCK_R


#: unsupported_reason's memo: its arguments -> its answer (a function of them and of the tile tables)
_UNSUPPORTED: dict = {}


def unsupported_reason(data_dtype: torch.dtype, head_dim: int, d_model: int, num_protos: int,
                       has_dropout: bool, device: Optional[torch.device] = None,
                       allow_tf32: bool = False) -> Optional[str]:
    """Why this call has no kernel (the op layer then runs eager), or None. Asked on every call of
    the layer, so memoized (S matters only for the dropout counters)."""
    key = (data_dtype, head_dim, d_model, num_protos if has_dropout else 0, has_dropout, device, allow_tf32)
    try:
        return _UNSUPPORTED[key]
    except KeyError:
        reason = _UNSUPPORTED[key] = _unsupported_reason(data_dtype, head_dim, d_model, num_protos, has_dropout,
                                                         device, allow_tf32)
        return reason


def _unsupported_reason(data_dtype, head_dim, d_model, num_protos, has_dropout, device, allow_tf32):
    if data_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {data_dtype} has no kernel (float32, bfloat16, float16 only)"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head width d_keys={head_dim} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if has_dropout and rows_per_philox_group(num_protos) < MAX_BLOCK_R:
        return f"S={num_protos} prototypes is too many for the dropout counters"
    if device is not None:
        gpu = device.type == "cuda" and not interpreting()
        if gpu and allow_tf32 and data_dtype == torch.float32:
            return "allow_tf32: TF32 runs eager (PyTorch's SDPA runs fp32 on tensor cores); the kernels are IEEE fp32"
        roles = ("fwd", "bwd_protos", "bwd_rows")
        if keys_first(d_model, head_dim):
            roles += ("prototype_logits", "prototype_logits_bwd")  # the factorized mc from projected keys
        for role in roles:
            if select_config(role, data_dtype, head_dim, d_model, has_dropout, device) is None:
                return no_config_reason(data_dtype, head_dim, d_model, arch_class(device) if gpu else 80)
    return None


def _seed_tensor(seed: Optional[torch.Tensor], dropout_p: float, device: torch.device) -> torch.Tensor:
    if seed is None:
        if dropout_p > 0.0:
            raise ValueError("dropout_p > 0 needs a seed tensor ([1] int64 on the device)")
        return torch.zeros((1,), dtype=torch.int64, device=device)
    return seed


def _require_unit_last_stride(**operands: torch.Tensor) -> None:
    for name, t in operands.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last axis, got strides {t.stride()}")


def _check_operands(x: torch.Tensor, mc: torch.Tensor, v: torch.Tensor) -> None:
    _require_unit_last_stride(x=x, mc=mc, v=v)
    if mc.stride(1) % PROTOTYPE_ALIGN or mc.shape[2] < v.shape[0]:
        raise ValueError(f"mc [H, W, S'] must span the S={v.shape[0]} prototypes with a row stride that is a "
                         f"multiple of {PROTOTYPE_ALIGN}, got shape {tuple(mc.shape)} strides {mc.stride()}")


#: launch plans are remembered for at most this many problems (a new row count is a new problem)
LAUNCH_PLAN_ENTRIES = 1024


def _problem_key(role: str, x, mc, v, *flags) -> tuple:
    """What fixes a launch plan: the operands' shapes, strides, dtypes and device, the launcher's
    flags (the dtypes of its other tensor arguments among them: a PlannedLaunch relies on the key
    holding every argument's dtype), the interpreter switch."""
    return (role, x.shape, x.stride(), mc.shape, mc.stride(), v.shape, v.stride(), x.dtype, mc.dtype, v.dtype,
            x.device, *flags, interpreting())


def _remember_plan(key: tuple, plan):
    """Keeps `plan` as the launch plan for `key` and returns it.

    A plan is everything a launch takes that its shapes, strides, dtypes and flags fix
    (configurations, grids, scalar arguments, buffer shapes), made once per problem: the launchers
    run on every call of the layer, and choosing all of it each time is Python the small official
    shapes feel. The operand checks run when a plan is made (the key holds every shape and stride
    they read). The launchers look a plan up in LAUNCH_PLANS themselves and come here only to
    make one (a maker passed in would be a closure built on every call)."""
    if len(LAUNCH_PLANS) >= LAUNCH_PLAN_ENTRIES:
        LAUNCH_PLANS.clear()
    LAUNCH_PLANS[key] = plan
    return plan


class _ForwardPlan(NamedTuple):
    # None: no rows, nothing to launch (an empty grid is not launchable everywhere); its scalars are
    # the integer and float arguments between lse and dropout_p
    kernel: Optional[PlannedLaunch]
    philox_rows: int
    out_shape: Tuple[int, int]  # [R, H*E]
    lse_shape: Tuple[int, int]  # [H, R]
    out_dtype: torch.dtype  # what the kernel writes (store_dtype)


def _forward_plan(x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, has_dropout, allow_tf32) -> _ForwardPlan:
    _check_operands(x, mc, v)
    R = x.shape[0]
    S, H, E = v.shape
    cfg = select_config("fwd", x.dtype, E, d_model, has_dropout, x.device, allow_tf32)
    scalars = (R, S, d_logit, H, E, x.stride(0), x_head_stride, mc.stride(0) // PROTOTYPE_ALIGN,
               mc.stride(1) // PROTOTYPE_ALIGN, v.stride(0), v.stride(1), int(has_bias), LOG2E * scale)
    kernel = PlannedLaunch((cdiv(R, cfg.block_r), H), launch_params(cfg), scalars) if R else None
    return _ForwardPlan(kernel, rows_per_philox_group(S), (R, H * E), (H, R), store_dtype(x.dtype))


def attention_forward(
    x: torch.Tensor,  # x: [R, *], logit operand rows (target, or Q on the standard form)
    mc: torch.Tensor,  # mc: [H, W, S']: Y_hᵀ in rows [0, D), c_h in row D when has_bias
    v: torch.Tensor,  # v: [S, H, E]
    d_logit: int,  # D: width of the logit dot products
    x_head_stride: int,  # 0 (factorized: every head reads the same target columns) or E
    has_bias: bool,
    scale: float,  # the logits' factor (1/sqrt(E))
    d_model: int,  # the layer's d_model (selects the factorized tile shape)
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # [1] int64 on the device; needed when dropout_p > 0
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:  # out: [R, H*E] in x's dtype, lse: [H, R] fp32 (base 2)
    device, dtype = x.device, x.dtype
    has_dropout = dropout_p > 0.0
    seed = _seed_tensor(seed, dropout_p, device)
    key = _problem_key("fwd", x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, has_dropout, allow_tf32,
                       seed.dtype)
    plan = LAUNCH_PLANS.get(key)
    if plan is None:
        plan = _remember_plan(key, _forward_plan(x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model,
                                                 has_dropout, allow_tf32))
    # sizes as separate arguments: PyTorch's argument parser takes them faster than a tuple
    out = torch.empty(*plan.out_shape, dtype=plan.out_dtype, device=device)
    lse = torch.empty(*plan.lse_shape, dtype=torch.float32, device=device)
    kernel = plan.kernel
    if kernel is not None:
        aligned = not (x.data_ptr() | mc.data_ptr() | v.data_ptr() | out.data_ptr() | lse.data_ptr()
                       | seed.data_ptr()) & 15  # every tensor argument below
        kernel(attention_fwd_kernel, aligned, x, mc, v, out, lse, *kernel.scalars, float(dropout_p), seed,
               plan.philox_rows)
    return (out if plan.out_dtype == dtype else out.to(dtype)), lse  # .to() is a dispatcher call even as a no-op


class _PrototypeLogitsPlan(NamedTuple):
    kernel: PlannedLaunch
    mc_shape: Tuple[int, int, int]  # [H, BLOCK_D + 1, S']
    mc_dtype: torch.dtype  # what the kernel writes (store_dtype)
    wqb_shape: Tuple[int, int]  # [H*E, BLOCK_D + 1]


def _prototype_logits_plan(wq, bq, k, n_heads) -> _PrototypeLogitsPlan:
    (HE, DM), (S, k_cols) = wq.shape, k.shape
    E = HE // n_heads
    if wq.dtype != bq.dtype or wq.dtype != k.dtype:
        raise ValueError(f"wq, bq and k must share a dtype, got {wq.dtype}, {bq.dtype}, {k.dtype}")
    if k_cols != HE or HE % n_heads or bq.shape != (HE,):
        raise ValueError(f"k [S, H*E] and bq [H*E] must match wq [H*E, d_model] with H={n_heads}, got k "
                         f"{tuple(k.shape)}, bq {tuple(bq.shape)}, wq {tuple(wq.shape)}")
    _require_unit_last_stride(wq=wq, bq=bq, k=k)
    cfg = select_config("prototype_logits", k.dtype, E, DM, False, k.device)
    if cfg is None or not keys_first(DM, E):
        raise ValueError(f"no prototype-logits kernel for d_model={DM}, d_keys={E}, {k.dtype} (the factorized "
                         f"form forms mc from K where d_keys <= BLOCK_D + 1: keys_first)")
    S_pad = S + (-S % PROTOTYPE_ALIGN)
    # one program per head at least: without prototypes the first still writes wqb
    kernel = PlannedLaunch((max(cdiv(S_pad, cfg.block_s), 1), n_heads), launch_params(cfg),
                           (S, S_pad, E, DM, wq.stride(0), k.stride(0)))
    return _PrototypeLogitsPlan(kernel, (n_heads, cfg.block_d + 1, S_pad), store_dtype(k.dtype), (HE, cfg.block_d + 1))


def prototype_logits(
    wq: torch.Tensor,  # wq: [H*E, DM], the query projection's weight
    bq: torch.Tensor,  # bq: [H*E], its bias
    k: torch.Tensor,  # k: [S, H*E], the projected keys
    n_heads: int,
) -> Tuple[torch.Tensor, torch.Tensor]:  # mc: [H, BLOCK_D + 1, S'] (S' = S rounded up to PROTOTYPE_ALIGN), wqb
    """The factorized form's prototype side from projected keys (prototype_logits_kernel), in k's
    dtype: mc, attention_forward's operand, whose rows [0, BLOCK_D) of mc_h are (K_h·Wq_h)ᵀ with
    zero rows past d_model, row BLOCK_D (K_h·bq_h)ᵀ, the alignment columns zeros; and wqb
    [H*E, BLOCK_D + 1], row h·E + e [Wq | zeros up to BLOCK_D | bq], of which mc_h = wqb_hᵀ·K_hᵀ.
    Not differentiable (the layer's backward differentiates it)."""
    key = ("prototype_logits", wq.shape, wq.stride(), k.shape, k.stride(), bq.shape, bq.stride(), wq.dtype, bq.dtype,
           k.dtype, k.device, n_heads, interpreting())
    plan = LAUNCH_PLANS.get(key)
    if plan is None:
        plan = _remember_plan(key, _prototype_logits_plan(wq, bq, k, n_heads))
    mc = torch.empty(*plan.mc_shape, dtype=plan.mc_dtype, device=k.device)
    wqb = torch.empty(*plan.wqb_shape, dtype=k.dtype, device=k.device)
    aligned = not (wq.data_ptr() | bq.data_ptr() | k.data_ptr() | mc.data_ptr() | wqb.data_ptr()) & 15
    plan.kernel(prototype_logits_kernel, aligned, wq, bq, k, mc, wqb, *plan.kernel.scalars)
    return (mc if plan.mc_dtype == k.dtype else mc.to(k.dtype)), wqb


class _PrototypeLogitsBackwardPlan(NamedTuple):
    kernel: PlannedLaunch
    dkt_shape: Tuple[int, int]  # [H*E, S]
    dwq_shape: Tuple[int, int]  # [H*E, DM]
    out_dtype: torch.dtype  # what the kernel writes (store_dtype)


def _prototype_logits_backward_plan(dmc, wqb, k, n_heads, d_model) -> _PrototypeLogitsBackwardPlan:
    (HE, W), (S, k_cols) = wqb.shape, k.shape
    E = HE // n_heads
    if dmc.dtype != torch.float32 or wqb.dtype != k.dtype:
        raise ValueError(f"dmc must be float32 and wqb share k's dtype, got {dmc.dtype}, {wqb.dtype}, {k.dtype}")
    if k_cols != HE or HE % n_heads or dmc.shape[:2] != (n_heads, W) or dmc.shape[2] < S:
        raise ValueError(f"dmc [H, W, S'] and k [S, H*E] must match wqb [H*E, W] with H={n_heads}, got dmc "
                         f"{tuple(dmc.shape)}, k {tuple(k.shape)}, wqb {tuple(wqb.shape)}")
    _require_unit_last_stride(dmc=dmc, wqb=wqb, k=k)
    cfg = select_config("prototype_logits_bwd", k.dtype, E, d_model, False, k.device)
    if cfg is None or not keys_first(d_model, E) or W != cfg.block_d + 1:
        raise ValueError(f"no prototype-logits backward for d_model={d_model}, d_keys={E}, W={W}, {k.dtype} "
                         f"(keys_first shapes only)")
    kernel = PlannedLaunch((n_heads,), launch_params(cfg),
                           (S, E, d_model, dmc.stride(0), dmc.stride(1), wqb.stride(0), k.stride(0)))
    return _PrototypeLogitsBackwardPlan(kernel, (HE, S), (HE, d_model), store_dtype(k.dtype))


def prototype_logits_backward(
    dmc: torch.Tensor,  # dmc: [H, BLOCK_D + 1, S'] fp32, attention_backward's
    wqb: torch.Tensor,  # wqb: [H*E, BLOCK_D + 1], prototype_logits'
    k: torch.Tensor,  # k: [S, H*E], the projected keys prototype_logits read
    n_heads: int, d_model: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # dkt [H*E, S], dwq [H*E, DM], dbq, dbk [H*E]
    """The gradients prototype_logits' mc passes on, in k's dtype (prototype_logits_bwd_kernel):
    d Kᵀ, Wq's and bq's, and bk's (Σ_s d Kᵀ: K = source·Wkᵀ + bk). dmc's alignment columns are
    not read."""
    key = ("prototype_logits_bwd", dmc.shape, dmc.stride(), wqb.shape, wqb.stride(), k.shape, k.stride(), dmc.dtype,
           wqb.dtype, k.dtype, k.device, n_heads, d_model, interpreting())
    plan = LAUNCH_PLANS.get(key)
    if plan is None:
        plan = _remember_plan(key, _prototype_logits_backward_plan(dmc, wqb, k, n_heads, d_model))
    dev, out_dtype = k.device, plan.out_dtype
    dkt = torch.empty(*plan.dkt_shape, dtype=out_dtype, device=dev)
    dwq = torch.empty(*plan.dwq_shape, dtype=out_dtype, device=dev)
    dbq = torch.empty(plan.dwq_shape[0], dtype=out_dtype, device=dev)
    dbk = torch.empty(plan.dwq_shape[0], dtype=out_dtype, device=dev)
    aligned = not (dmc.data_ptr() | wqb.data_ptr() | k.data_ptr() | dkt.data_ptr() | dwq.data_ptr() | dbq.data_ptr()
                   | dbk.data_ptr()) & 15
    plan.kernel(prototype_logits_bwd_kernel, aligned, dmc, wqb, k, dkt, dwq, dbq, dbk, *plan.kernel.scalars)
    if out_dtype != k.dtype:  # the interpreter's bf16, rounded by torch (store_dtype)
        return dkt.to(k.dtype), dwq.to(k.dtype), dbq.to(k.dtype), dbk.to(k.dtype)
    return dkt, dwq, dbq, dbk


def protos_rows_per_chunk(num_rows: int, num_proto_blocks: int, n_heads: int, block_r: int) -> int:
    """Rows per program of the prototype-stationary backward: enough chunks to fill the GPU, each a
    whole number of row blocks (at least four, so a chunk amortizes loading its prototype tile).

    Depends on the shapes only, not on the GPU, so a problem always sums the same partials in
    the same order.
    """
    chunks = max(1, -(-PROTOS_TARGET_PROGRAMS // (num_proto_blocks * n_heads)))
    rows = max(4 * block_r, -(-num_rows // chunks))
    return -(-rows // block_r) * block_r


class _BackwardPlan(NamedTuple):
    shapes: tuple  # (R, S, H, E, W, S', dx columns)
    atomic_dx: bool  # dx added by the prototype-stationary kernel with atomics (default mode)
    # each kernel's scalars: its integer and float arguments after the tensors (before the dropout arguments)
    delta: Optional[PlannedLaunch]  # None: no rows
    protos: Optional[PlannedLaunch]  # None where the prototype side is not needed; grid[2]: its row chunks
    rows: Optional[PlannedLaunch]  # the row-stationary dx (deterministic mode, or dx alone)
    rows_dx_shape: tuple  # its buffer: [H, R, dx columns] (factorized, summed over heads) or [R, dx columns]
    philox_rows: int


def _backward_plan(x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, has_dropout, allow_tf32, need_dx,
                   need_protos, deterministic) -> _BackwardPlan:
    _check_operands(x, mc, v)
    R = x.shape[0]
    S, H, E = v.shape
    _, W, S_pad = mc.shape
    dev, dt = x.device, x.dtype
    dx_cols = x.shape[1]
    shapes = (R, S, H, E, W, S_pad, dx_cols)
    atomic_dx = need_dx and need_protos and not deterministic
    philox_rows = rows_per_philox_group(S)
    if R == 0:
        return _BackwardPlan(shapes, atomic_dx, None, None, None, (), philox_rows)
    common = (int(has_bias), LOG2E * scale, scale)
    operand_strides = (x.stride(0), x_head_stride, mc.stride(0) // PROTOTYPE_ALIGN, mc.stride(1) // PROTOTYPE_ALIGN,
                       v.stride(0), v.stride(1), dx_cols)
    delta_cfg = select_config("bwd_delta", dt, E, d_model, False, dev, allow_tf32)
    delta = PlannedLaunch((cdiv(R, delta_cfg.block_r),), launch_params(delta_cfg), (R, H, E, dx_cols, int(atomic_dx)))
    protos = None
    if need_protos:
        cfg = select_config("bwd_protos", dt, E, d_model, has_dropout, dev, allow_tf32)
        proto_blocks = cdiv(S, cfg.block_s)
        rows_per_chunk = protos_rows_per_chunk(R, proto_blocks, H, cfg.block_r)
        chunks = cdiv(R, rows_per_chunk)
        protos = PlannedLaunch((proto_blocks, H, chunks), launch_params(cfg),
                               (R, S, d_logit, H, E, W, S_pad, *operand_strides, rows_per_chunk, *common, int(atomic_dx)))
    rows, rows_dx_shape = None, ()
    if need_dx and not atomic_dx:
        cfg = select_config("bwd_rows", dt, E, d_model, has_dropout, dev, allow_tf32)
        if x_head_stride == 0:  # factorized: every head adds into the same target columns
            rows_dx_shape, head_stride = (H, R, dx_cols), R * dx_cols
        else:  # standard: head h owns columns h·E + [0, E) of dQ
            rows_dx_shape, head_stride = (R, dx_cols), x_head_stride
        rows = PlannedLaunch((cdiv(R, cfg.block_r), H), launch_params(cfg),
                             (R, S, d_logit, H, E, *operand_strides, head_stride, *common))
    return _BackwardPlan(shapes, atomic_dx, delta, protos, rows, rows_dx_shape, philox_rows)


def attention_backward(
    x: torch.Tensor,  # x: [R, *] as in attention_forward
    mc: torch.Tensor,  # mc: [H, W, S'] as in attention_forward
    v: torch.Tensor,  # v: [S, H, E] as in attention_forward
    out: torch.Tensor,  # out: [R, H*E], attention_forward's
    grad: torch.Tensor,  # grad: [R, H*E], its gradient
    lse: torch.Tensor,  # lse: [H, R] fp32, attention_forward's
    d_logit: int, x_head_stride: int, has_bias: bool, scale: float, d_model: int,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # the forward's
    allow_tf32: bool = False,
    need_dx: bool = True,
    need_protos: bool = True,
    deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx: [R, x.shape[1]] fp32, dmc: [H, W, S'] fp32, dv: [S, H, E] fp32), None where not needed;
    dmc's prototype columns S..S' (mc's alignment padding) are zeros.

    Default mode: the prototype-stationary kernel forms every element once and adds dx with atomics.
    deterministic: dx from the row-stationary kernel instead (fixed reduction order everywhere).
    """
    dev = x.device
    has_dropout = dropout_p > 0.0
    seed = _seed_tensor(seed, dropout_p, dev)
    key = _problem_key("bwd", x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, has_dropout, allow_tf32,
                       need_dx, need_protos, deterministic, out.dtype, grad.dtype, lse.dtype, seed.dtype)
    plan = LAUNCH_PLANS.get(key)
    if plan is None:
        plan = _remember_plan(key, _backward_plan(x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model,
                                                  has_dropout, allow_tf32, need_dx, need_protos, deterministic))
    R, S, H, E, W, S_pad, dx_cols = plan.shapes
    f32 = torch.float32
    if plan.delta is None:  # empty batch: dx is empty and the prototype side is a sum over no rows
        return (torch.zeros((0, dx_cols), dtype=f32, device=dev) if need_dx else None,
                torch.zeros((H, W, S_pad), dtype=f32, device=dev) if need_protos else None,
                torch.zeros((S, H, E), dtype=f32, device=dev) if need_protos else None)
    # .contiguous() is a dispatcher call even when it returns its input
    grad = grad if grad.is_contiguous() else grad.contiguous()
    out = out if out.is_contiguous() else out.contiguous()
    philox = (float(dropout_p), seed, plan.philox_rows)

    atomic_dx = plan.atomic_dx
    delta = torch.empty(H, R, dtype=f32, device=dev)  # sizes as separate arguments, as in attention_forward
    dx = torch.empty(R, dx_cols, dtype=f32, device=dev) if atomic_dx else None  # zeroed by the delta kernel
    dx_or_delta = dx if atomic_dx else delta  # the delta kernel's dx argument (untouched without atomics)
    # the addresses of every tensor the launches below pass, OR-ed: 16-byte aligned where its low bits are 0
    addresses = (x.data_ptr() | mc.data_ptr() | v.data_ptr() | out.data_ptr() | grad.data_ptr() | lse.data_ptr()
                 | seed.data_ptr() | delta.data_ptr() | dx_or_delta.data_ptr())
    plan.delta(attention_bwd_delta_kernel, not addresses & 15, out, grad, delta, dx_or_delta, *plan.delta.scalars)

    dmc = dv = None
    if plan.protos is not None:
        # one chunk: the kernel writes the result itself (same layout, no chunk axis to reduce or index)
        chunks = plan.protos.grid[2]  # partial sums of dmc and dv over row chunks
        chunk_axis = (chunks,) if chunks > 1 else ()
        dmc_partial = torch.empty(*chunk_axis, H, W, S_pad, dtype=f32, device=dev)  # [(C,) H, W, S']
        dv_partial = torch.empty(*chunk_axis, S, H, E, dtype=f32, device=dev)  # [(C,) S, H, E]
        plan.protos(attention_bwd_protos_kernel, not (addresses | dmc_partial.data_ptr() | dv_partial.data_ptr()) & 15,
                    x, mc, v, grad, lse, delta, dmc_partial, dv_partial, dx if atomic_dx else dmc_partial,
                    *plan.protos.scalars, *philox)
        dmc = dmc_partial.sum(0) if chunk_axis else dmc_partial
        dv = dv_partial.sum(0) if chunk_axis else dv_partial

    if plan.rows is not None:
        dx_heads = torch.empty(*plan.rows_dx_shape, dtype=f32, device=dev)
        plan.rows(attention_bwd_rows_kernel, not (addresses | dx_heads.data_ptr()) & 15,
                  x, mc, v, grad, lse, delta, dx_heads, *plan.rows.scalars, *philox)
        dx = dx_heads.sum(0) if x_head_stride == 0 else dx_heads
    return dx, dmc, dv


def dropout_keep_mask(num_rows: int, num_protos: int, n_heads: int, dropout_p: float, seed: int,
                      device: torch.device) -> torch.Tensor:  # keep: [H, R, S] bool
    """The dropout mask the attention kernels apply for (seed, dropout_p), materialized (tests/debugging).

    keep[h, r, s] multiplies the probability of row r (of B'·L), head h, prototype s.
    """
    cfg = select_config("dropout_mask", torch.float32, 16, 16, True, device)
    keep = torch.empty((n_heads, num_rows, num_protos), dtype=torch.int8, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    launch(dropout_keep_mask_kernel, (cdiv(num_rows, cfg.block_r), n_heads), launch_params(cfg),
           keep, num_rows, num_protos, n_heads, float(dropout_p), seed_t, rows_per_philox_group(num_protos))
    return keep.bool()


def aot_configs() -> list:
    """Every configuration a launcher can choose on a GPU, for kernels/report.py (ahead-of-time builds)."""
    return tiles_aot_configs(KERNELS)
