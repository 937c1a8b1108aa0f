"""Fused cross-attention of Time-LLM's reprogramming layer (SPEC §1.2): Triton kernels and launchers.

Notation, used in every shape comment below:

* ``R = B'·L`` query rows (the batch and patch axes folded together: every row attends to the
  same prototypes, so the batch is just more rows),
* ``H`` heads of width ``E`` (``HE = H·E``), ``DM = d_model``, ``S`` prototypes.

What the kernels compute, per (row r, head h):

    q       = target[r] · Wq[hE:(h+1)E]ᵀ + bq[hE:(h+1)E]                         (never stored)
    P[s]    = softmax_s(q · K[s, hE:(h+1)E] / sqrt(E))
    out[r, hE:(h+1)E] = Σ_s dropout(P)[s] · V[s, hE:(h+1)E]
    lse[h, r] = log2 Σ_s 2^(q·K[s]·log2(e)/sqrt(E))       (base 2: the kernels work with exp2)

K and V come from GEMMs in the op layer (timellm_fast/reprogramming.py); so do the output
projection and every weight gradient. The kernels only cover the part that would otherwise
materialize the [B', H, L, S] attention matrix.

Dropout (training) uses Triton's counter-based Philox generator, so the backward kernels
regenerate the forward's mask instead of storing it. Each element (r, h, s) of the virtual
[R, H, S] probability matrix gets

    key     = seed + 2**32 · (h + H · (r // rows_per_group))
    counter = (r mod rows_per_group) · S + s

`rows_per_group` is a multiple of 128 chosen on the host so that every counter fits in int32
(``rows_per_group · S < 2**31``); any row block of at most 128 rows aligned to its size lies in
one group, so the key is a scalar per block. Distinct (seed, h, group) give distinct Philox keys
and distinct (r, s) inside a group give distinct counters: every element draws its own number
whatever the tiling, which is what lets three kernels with different tilings agree on the mask.
An element is kept when its uniform draw is >= dropout_p, with probability 1 - dropout_p.

Every configuration a launcher can pick comes from :func:`config_table`; :func:`aot_configs`
lists the same table for ahead-of-time compilation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import (SIG_DTYPE, TL_DTYPE, cdiv, device_capability, dot_dtype, input_precision, interpreting,
                      next_pow2, store_dtype)

#: head widths the kernels accept; E is padded with masks up to the next block width
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
BLOCK_E_CHOICES = (32, 64, 128)
#: the d_model axis of the query prologue is walked in chunks of this width (tl.dot needs >= 16)
BLOCK_DM = 16
#: largest row block of any kernel; Philox row groups are multiples of it
MAX_BLOCK_R = 128
#: the dK/dV kernel splits the rows into chunks until the grid has about this many programs
DKDV_TARGET_PROGRAMS = 512
INT32_LIMIT = 2**31 - 1

_LOG2E = 1.4426950408889634


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
def _project_query(
    target_ptr,  # target: [R, DM]
    wq_ptr,  # wq: [H*E, DM]
    bq_ptr,  # bq: [H*E]
    offs_r,  # [BLOCK_R] global row indices
    r_mask,  # [BLOCK_R]
    offs_e,  # [BLOCK_E]
    e_mask,  # [BLOCK_E]
    head,
    DM,
    E,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_DM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
):
    """q: [BLOCK_R, BLOCK_E] in DOT_DTYPE, this head's query projection of the given target rows
    (accumulated and biased in fp32, rounded once for the attention dots)."""
    offs_dm = tl.arange(0, BLOCK_DM)
    target_rows = target_ptr + offs_r.to(tl.int64)[:, None] * DM  # [BLOCK_R, 1]
    wq_cols = wq_ptr + (head * E + offs_e)[None, :] * DM  # [1, BLOCK_E]
    q = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    for dm_start in range(0, DM, BLOCK_DM):
        dm = dm_start + offs_dm
        dm_mask = dm < DM
        target_tile = tl.load(target_rows + dm[None, :], mask=r_mask[:, None] & dm_mask[None, :], other=0.0)
        wq_tile = tl.load(wq_cols + dm[:, None], mask=dm_mask[:, None] & e_mask[None, :], other=0.0)
        # target_tile: [BLOCK_R, BLOCK_DM], wq_tile: [BLOCK_DM, BLOCK_E]
        q = tl.dot(target_tile.to(DOT_DTYPE), wq_tile.to(DOT_DTYPE), q, input_precision=INPUT_PRECISION)
    bias = tl.load(bq_ptr + head * E + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    return _dot_operand(q + bias[None, :], DOT_DTYPE, ROUND_TO_BF16)


@triton.jit
def _load_kv_tile(k_ptr, v_ptr, offs_s, s_mask, head_cols, e_mask, stride_kv, DOT_DTYPE: tl.constexpr):
    """(k, v): [BLOCK_S, BLOCK_E] each in DOT_DTYPE, this head's prototypes offs_s (0 outside S, E)."""
    offsets = offs_s[:, None] * stride_kv + head_cols[None, :]
    mask = s_mask[:, None] & e_mask[None, :]
    k = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(DOT_DTYPE)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(DOT_DTYPE)
    return k, v


@triton.jit
def _dropout_keep(seed, head, H, block_row_start, rows_per_group, rows, protos, S, dropout_p):
    """Keep mask (True = kept) for the elements (rows, protos); the two broadcast against each other.

    The (key, counter) scheme is documented at the top of this module; `block_row_start` must be
    the first row of a block that does not cross a multiple of `rows_per_group`. The kernels mark
    `seed` do_not_specialize: the JIT would otherwise turn a seed of 1 into a constexpr (no .to())
    and compile twice for seeds that are and are not multiples of 16.
    """
    group = block_row_start // rows_per_group
    key = seed.to(tl.uint64) + ((head + H * group).to(tl.uint64) << 32)
    counter = (rows - group * rows_per_group) * S + protos
    return tl.rand(key, counter) >= dropout_p


@triton.jit
def _probs_and_grads(
    q,  # [BLOCK_R, BLOCK_E] in DOT_DTYPE
    dout,  # [BLOCK_R, BLOCK_E] in DOT_DTYPE
    lse,  # [BLOCK_R] fp32, base 2
    k_ptr,  # k: [S, H*E], row stride stride_kv
    v_ptr,  # v: [S, H*E], row stride stride_kv
    proto_start,
    head_cols,  # [BLOCK_E] columns of this head in H*E
    e_mask,  # [BLOCK_E]
    offs_r,  # [BLOCK_R]
    row_start,
    head,
    H,
    S,
    stride_kv,
    qk_scale_log2,
    dropout_p,
    seed,
    rows_per_group,
    BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """For the prototypes [proto_start, proto_start + BLOCK_S): (k, P, dP).

    k: [BLOCK_S, BLOCK_E] in DOT_DTYPE; P: [BLOCK_R, BLOCK_S] the softmax probabilities before
    dropout (0 past S); dP: [BLOCK_R, BLOCK_S] the gradient w.r.t. P, i.e. dout·Vᵀ through the
    forward's dropout mask and 1/(1-p).
    """
    offs_s = proto_start + tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    k, v = _load_kv_tile(k_ptr, v_ptr, offs_s, s_mask, head_cols, e_mask, stride_kv, DOT_DTYPE)
    scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2
    probs = tl.where(s_mask[None, :], tl.exp2(scores - lse[:, None]), 0.0)
    dprobs = tl.dot(dout, tl.trans(v), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S,
                             dropout_p)
        dprobs = tl.where(keep, dprobs * (1.0 / (1.0 - dropout_p)), 0.0)
    return k, probs, dprobs


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def reprogramming_fwd_kernel(
    target_ptr,  # target: [R, DM]
    wq_ptr,  # wq: [H*E, DM]
    bq_ptr,  # bq: [H*E]
    k_ptr,  # k: [S, H*E], row stride stride_kv
    v_ptr,  # v: [S, H*E], row stride stride_kv
    out_ptr,  # out: [R, H*E] (heads merged, what the out projection reads)
    lse_ptr,  # lse: [H, R] fp32, base-2 log-sum-exp of the log2(e)/sqrt(E)-scaled scores
    R,
    S,
    DM,
    H,
    E,
    stride_kv,
    qk_scale_log2,  # log2(e) / sqrt(E)
    dropout_p,
    seed_ptr,  # seed: [1] int64 on the device (a device draw: CUDA-graph replays draw anew)
    rows_per_group,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_DM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    row_start = tl.program_id(0) * BLOCK_R
    head = tl.program_id(1)
    offs_r = row_start + tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    r_mask = offs_r < R
    e_mask = offs_e < E

    q = _project_query(target_ptr, wq_ptr, bq_ptr, offs_r, r_mask, offs_e, e_mask, head, DM, E,
                       BLOCK_R, BLOCK_E, BLOCK_DM, DOT_DTYPE, INPUT_PRECISION, ROUND_TO_BF16)

    head_cols = head * E + offs_e
    row_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    for proto_start in range(0, S, BLOCK_S):
        offs_s = proto_start + tl.arange(0, BLOCK_S)
        s_mask = offs_s < S
        k, v = _load_kv_tile(k_ptr, v_ptr, offs_s, s_mask, head_cols, e_mask, stride_kv, DOT_DTYPE)

        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2  # [BLOCK_R, BLOCK_S]
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        # the softmax normalizer counts every prototype; dropout acts on the normalized probabilities
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S,
                                 dropout_p)
            probs = tl.where(keep, probs, 0.0)
        acc = acc * rescale[:, None]
        acc = tl.dot(_dot_operand(probs, DOT_DTYPE, ROUND_TO_BF16), v, acc, input_precision=INPUT_PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    out_ptrs = out_ptr + offs_r.to(tl.int64)[:, None] * (H * E) + head_cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & e_mask[None, :])
    tl.store(lse_ptr + head * R + offs_r, row_max + tl.log2(row_sum), mask=r_mask)


@triton.jit
def reprogramming_bwd_dq_kernel(
    target_ptr,  # target: [R, DM]
    wq_ptr,  # wq: [H*E, DM]
    bq_ptr,  # bq: [H*E]
    k_ptr,  # k: [S, H*E], row stride stride_kv
    v_ptr,  # v: [S, H*E], row stride stride_kv
    dout_ptr,  # dout: [R, H*E], gradient of the forward output
    lse_ptr,  # lse: [H, R] fp32, from the forward
    delta_ptr,  # delta: [H, R] fp32, written here: sum_s P·dP per (row, head)
    dq_ptr,  # dq: [R, H*E], written here: gradient of the query projection
    R,
    S,
    DM,
    H,
    E,
    stride_kv,
    qk_scale_log2,  # log2(e) / sqrt(E)
    sm_scale,  # 1 / sqrt(E)
    dropout_p,
    seed_ptr,  # seed: [1] int64 on the device (a device draw: CUDA-graph replays draw anew)
    rows_per_group,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_DM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    row_start = tl.program_id(0) * BLOCK_R
    head = tl.program_id(1)
    offs_r = row_start + tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    r_mask = offs_r < R
    e_mask = offs_e < E
    head_cols = head * E + offs_e
    re_mask = r_mask[:, None] & e_mask[None, :]
    re_offsets = offs_r.to(tl.int64)[:, None] * (H * E) + head_cols[None, :]

    q = _project_query(target_ptr, wq_ptr, bq_ptr, offs_r, r_mask, offs_e, e_mask, head, DM, E,
                       BLOCK_R, BLOCK_E, BLOCK_DM, DOT_DTYPE, INPUT_PRECISION, ROUND_TO_BF16)
    dout = tl.load(dout_ptr + re_offsets, mask=re_mask, other=0.0).to(DOT_DTYPE)  # [BLOCK_R, BLOCK_E]
    lse = tl.load(lse_ptr + head * R + offs_r, mask=r_mask, other=0.0)  # [BLOCK_R]

    # Pass 1: delta = sum_s P·dP from the very P and dP used below, so every row of the softmax
    # gradient sums to zero as it must. FlashAttention's rowsum(dout * out) is the same number in
    # exact arithmetic, but the forward rounds P (PV dot operand) and `out` (store) to the data
    # dtype; in bf16 that put the key-bias gradient, exactly zero, at up to 2.2x the eager
    # layer's error, past SPEC's 2x, where this pass gives 1.4x (bench/ROOFLINE.md, "Delta").
    delta = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for proto_start in range(0, S, BLOCK_S):
        _, probs, dprobs = _probs_and_grads(q, dout, lse, k_ptr, v_ptr, proto_start, head_cols, e_mask, offs_r,
                                            row_start, head, H, S, stride_kv, qk_scale_log2, dropout_p, seed,
                                            rows_per_group, BLOCK_S, DOT_DTYPE, INPUT_PRECISION, HAS_DROPOUT)
        delta += tl.sum(probs * dprobs, axis=1)
    tl.store(delta_ptr + head * R + offs_r, delta, mask=r_mask)

    # Pass 2: dQ = sum_s P·(dP - delta)·K / sqrt(E)
    dq = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    for proto_start in range(0, S, BLOCK_S):
        k, probs, dprobs = _probs_and_grads(q, dout, lse, k_ptr, v_ptr, proto_start, head_cols, e_mask, offs_r,
                                            row_start, head, H, S, stride_kv, qk_scale_log2, dropout_p, seed,
                                            rows_per_group, BLOCK_S, DOT_DTYPE, INPUT_PRECISION, HAS_DROPOUT)
        dscores = probs * (dprobs - delta[:, None])
        dq = tl.dot(_dot_operand(dscores, DOT_DTYPE, ROUND_TO_BF16), k, dq, input_precision=INPUT_PRECISION)

    dq = dq * sm_scale
    tl.store(dq_ptr + re_offsets, dq.to(dq_ptr.dtype.element_ty), mask=re_mask)


@triton.jit
def reprogramming_bwd_dkdv_kernel(
    target_ptr,  # target: [R, DM]
    wq_ptr,  # wq: [H*E, DM]
    bq_ptr,  # bq: [H*E]
    k_ptr,  # k: [S, H*E], row stride stride_kv
    v_ptr,  # v: [S, H*E], row stride stride_kv
    dout_ptr,  # dout: [R, H*E]
    lse_ptr,  # lse: [H, R] fp32
    delta_ptr,  # delta: [H, R] fp32, from the dQ kernel
    dkv_partial_ptr,  # dkv_partial: [n_chunks, S, 2*H*E] fp32, written here; dK in [0, HE), dV in [HE, 2HE)
    R,
    S,
    DM,
    H,
    E,
    stride_kv,
    rows_per_chunk,  # a multiple of BLOCK_R
    qk_scale_log2,  # log2(e) / sqrt(E)
    sm_scale,  # 1 / sqrt(E)
    dropout_p,
    seed_ptr,  # seed: [1] int64 on the device (a device draw: CUDA-graph replays draw anew)
    rows_per_group,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_DM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    proto_start = tl.program_id(0) * BLOCK_S
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    offs_s = proto_start + tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    s_mask = offs_s < S
    e_mask = offs_e < E
    head_cols = head * E + offs_e
    k, v = _load_kv_tile(k_ptr, v_ptr, offs_s, s_mask, head_cols, e_mask, stride_kv, DOT_DTYPE)
    kv_mask = s_mask[:, None] & e_mask[None, :]  # for the dK/dV partial stores

    dk = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    chunk_start = chunk * rows_per_chunk
    chunk_end = tl.minimum(chunk_start + rows_per_chunk, R)
    for row_start in range(chunk_start, chunk_end, BLOCK_R):
        offs_r = row_start + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        q = _project_query(target_ptr, wq_ptr, bq_ptr, offs_r, r_mask, offs_e, e_mask, head, DM, E,
                           BLOCK_R, BLOCK_E, BLOCK_DM, DOT_DTYPE, INPUT_PRECISION, ROUND_TO_BF16)
        dout_ptrs = dout_ptr + offs_r.to(tl.int64)[:, None] * (H * E) + head_cols[None, :]
        dout = tl.load(dout_ptrs, mask=r_mask[:, None] & e_mask[None, :], other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_ptr + head * R + offs_r, mask=r_mask, other=0.0)  # [BLOCK_R]
        delta = tl.load(delta_ptr + head * R + offs_r, mask=r_mask, other=0.0)  # [BLOCK_R]

        # transposed orientation [BLOCK_S, BLOCK_R]: dK and dV reduce over rows
        scores_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale_log2
        probs_t = tl.exp2(scores_t - lse[None, :])
        # padded rows load dout = delta = 0, which zeroes their terms, but exp2(score - 0) can
        # overflow to inf there, and inf·0 is NaN
        probs_t = tl.where(r_mask[None, :], probs_t, 0.0)
        dprobs_t = tl.dot(v, tl.trans(dout), input_precision=INPUT_PRECISION)  # [BLOCK_S, BLOCK_R]
        if HAS_DROPOUT:
            keep_t = _dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[None, :], offs_s[:, None], S,
                                   dropout_p)
            keep_scale = 1.0 / (1.0 - dropout_p)
            attn_t = tl.where(keep_t, probs_t * keep_scale, 0.0)
            dprobs_t = tl.where(keep_t, dprobs_t * keep_scale, 0.0)
        else:
            attn_t = probs_t
        dv = tl.dot(_dot_operand(attn_t, DOT_DTYPE, ROUND_TO_BF16), dout, dv, input_precision=INPUT_PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk = tl.dot(_dot_operand(dscores_t, DOT_DTYPE, ROUND_TO_BF16), q, dk, input_precision=INPUT_PRECISION)

    dk = dk * sm_scale
    partial_ptrs = (dkv_partial_ptr + chunk.to(tl.int64) * S * (2 * H * E) + offs_s[:, None] * (2 * H * E)
                    + head_cols[None, :])
    tl.store(partial_ptrs, dk, mask=kv_mask)
    tl.store(partial_ptrs + H * E, dv, mask=kv_mask)


@triton.jit
def dropout_keep_mask_kernel(
    keep_ptr,  # keep: [H, R, S] int8, written here (1 = kept)
    R,
    S,
    H,
    dropout_p,
    seed_ptr,  # seed: [1] int64 on the device (a device draw: CUDA-graph replays draw anew)
    rows_per_group,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
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


# ---------------------------------------------------------------------------------------------
# the configuration table (the only source of launch parameters)
# ---------------------------------------------------------------------------------------------

_KERNELS = {
    "fwd": reprogramming_fwd_kernel,
    "bwd_dq": reprogramming_bwd_dq_kernel,
    "bwd_dkdv": reprogramming_bwd_dkdv_kernel,
    "dropout_mask": dropout_keep_mask_kernel,
}
# pointer arguments that hold fp32 statistics whatever the data dtype
_FP32_POINTERS = {"lse_ptr", "delta_ptr", "dkv_partial_ptr"}
_INT8_POINTERS = {"keep_ptr"}
_FLOAT_SCALARS = {"qk_scale_log2", "sm_scale", "dropout_p"}
ALL_ARCHS = (75, 80, 90)
SM80_ARCHS = (80, 90)

#: (data dtype, dot dtype, input precision) combinations a launcher can reach:
#: half dtypes on their own tensor-core path; bf16 also through fp32 dots (sm_75 has no bf16 MMA,
#: and the interpreter cannot multiply bf16, see kernels/_launch.dot_dtype); fp32 IEEE, or TF32
#: when the caller opts in on sm_80+.
_DTYPE_PATHS = (
    (torch.float32, torch.float32, "ieee"),
    (torch.float32, torch.float32, "tf32"),
    (torch.bfloat16, torch.bfloat16, "ieee"),
    (torch.bfloat16, torch.float32, "ieee"),
    (torch.float16, torch.float16, "ieee"),
)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    role: str
    data_dtype: torch.dtype
    dot_dtype: torch.dtype
    input_precision: str
    block_e: int
    has_dropout: bool
    block_r: int
    block_s: int
    num_warps: int
    num_stages: int
    #: "sm90": the Hopper-only variant of a key in _TILES_SM90; "not-sm90": that key's entry
    #: for the other GPUs; None: one tile for every GPU
    arch_split: Optional[str] = None

    @property
    def name(self) -> str:
        if self.role == "dropout_mask":
            return "reprogramming_dropout_mask"
        dot = SIG_DTYPE[self.dot_dtype] + ("_tf32" if self.input_precision == "tf32" else "")
        drop = ",dropout" if self.has_dropout else ""
        only = ",sm90" if self.arch_split == "sm90" else ""
        return f"reprogramming_{self.role}[{SIG_DTYPE[self.data_dtype]},dot={dot},E={self.block_e}{drop}{only}]"

    @property
    def tile_key(self) -> tuple:
        return (self.role, dot_regime(self.dot_dtype, self.input_precision), self.block_e, self.has_dropout)

    @property
    def archs(self) -> Tuple[int, ...]:
        """Compute capabilities (75, 80, 90 stand for sm_75, sm_80..89, sm_90+) this configuration
        can be chosen on: bf16 MMA and TF32 need sm_80."""
        if self.data_dtype == torch.bfloat16 and self.dot_dtype == torch.float32:
            return (75,)  # bf16 data takes fp32 dots only where there is no bf16 MMA
        needs_sm80 = self.dot_dtype == torch.bfloat16 or self.input_precision == "tf32"
        # Turing's fp16 MMA spills at E = 128 even with 16-row tiles: eager runs there instead
        needs_sm80 = needs_sm80 or (self.dot_dtype == torch.float16 and self.block_e == 128)
        archs = SM80_ARCHS if needs_sm80 else ALL_ARCHS
        if self.arch_split == "sm90":
            return tuple(a for a in archs if a == 90)
        if self.arch_split == "not-sm90":
            return tuple(a for a in archs if a != 90)
        return archs

    def constexprs(self) -> Dict[str, object]:
        if self.role == "dropout_mask":
            return {"BLOCK_R": self.block_r, "BLOCK_S": self.block_s}
        return {
            "BLOCK_R": self.block_r,
            "BLOCK_S": self.block_s,
            "BLOCK_E": self.block_e,
            "BLOCK_DM": BLOCK_DM,
            "DOT_DTYPE": TL_DTYPE[self.dot_dtype],
            "INPUT_PRECISION": self.input_precision,
            "HAS_DROPOUT": self.has_dropout,
            "ROUND_TO_BF16": False,  # the interpreter's stand-in for bf16 MMA: _launch_params
        }


# (BLOCK_R, BLOCK_S, num_warps, num_stages) per (role, dot regime, BLOCK_E, dropout): a tile
# spill-free (ptxas -v, compiled as the JIT specializes SPEC §2 shapes: kernels/report.py
# jit_specialization) on every GPU the configuration can run on, within sm_75's 64 KiB of shared
# memory, with both Triton 3.6 (the GPU machines') and 3.9 (CI's), whose register counts differ by
# tens of registers either way. Measured tiles: the bf16 entries without dropout at E = 32 and
# 128 are the fastest such tile of a sweep on an H200 (bench/tune_attention.py, Triton 3.6,
# 2026-11-26, ETTh1- and Weather-folded rows; bench/results/nvidia-h200-2026-11-26-run1/tune.json,
# filtered by bench/aot_filter_tiles.py). Every other entry is the largest tile that fits, not yet
# timed on a GPU. Three register regimes: IEEE fp32 dots ("fma",
# also bf16 data where there is no bf16 MMA) run on FMA units, whose operand layouts hold whole
# rows of both operands per thread, so their tiles are small; TF32 and half-precision MMA hold
# fragments only. fp16 must also fit Turing (sm_75), whose MMA lowering needs more registers
# than sm_80's.
_TILES = {
    ("fwd", "fma", 32, False): (64, 32, 8, 1), ("fwd", "fma", 32, True): (64, 32, 8, 1),
    ("fwd", "fma", 64, False): (64, 32, 8, 1), ("fwd", "fma", 64, True): (64, 32, 8, 2),
    ("fwd", "fma", 128, False): (32, 16, 8, 1), ("fwd", "fma", 128, True): (32, 16, 8, 1),
    ("fwd", "tf32", 32, False): (128, 64, 4, 2), ("fwd", "tf32", 32, True): (128, 64, 8, 2),
    ("fwd", "tf32", 64, False): (128, 64, 8, 2), ("fwd", "tf32", 64, True): (64, 32, 4, 2),
    ("fwd", "tf32", 128, False): (64, 64, 8, 2), ("fwd", "tf32", 128, True): (64, 32, 8, 2),
    ("fwd", "bf16", 32, False): (64, 64, 4, 3), ("fwd", "bf16", 32, True): (128, 64, 8, 2),
    ("fwd", "bf16", 64, False): (128, 64, 8, 2), ("fwd", "bf16", 64, True): (128, 64, 8, 2),
    ("fwd", "bf16", 128, False): (128, 64, 8, 3), ("fwd", "bf16", 128, True): (64, 32, 8, 2),
    ("fwd", "fp16", 32, False): (64, 32, 4, 2), ("fwd", "fp16", 32, True): (64, 32, 4, 2),
    ("fwd", "fp16", 64, False): (64, 32, 8, 2), ("fwd", "fp16", 64, True): (64, 32, 8, 2),
    ("fwd", "fp16", 128, False): (32, 32, 8, 2), ("fwd", "fp16", 128, True): (32, 32, 8, 2),
    ("bwd_dq", "fma", 32, False): (64, 32, 8, 1), ("bwd_dq", "fma", 32, True): (64, 32, 8, 1),
    ("bwd_dq", "fma", 64, False): (32, 32, 8, 1), ("bwd_dq", "fma", 64, True): (16, 16, 4, 2),
    ("bwd_dq", "fma", 128, False): (16, 16, 8, 1), ("bwd_dq", "fma", 128, True): (16, 16, 8, 1),
    ("bwd_dq", "tf32", 32, False): (64, 32, 8, 2), ("bwd_dq", "tf32", 32, True): (64, 32, 8, 2),
    ("bwd_dq", "tf32", 64, False): (32, 32, 4, 2), ("bwd_dq", "tf32", 64, True): (32, 32, 8, 2),
    ("bwd_dq", "tf32", 128, False): (32, 16, 4, 2), ("bwd_dq", "tf32", 128, True): (32, 16, 4, 2),
    ("bwd_dq", "bf16", 32, False): (128, 32, 4, 3), ("bwd_dq", "bf16", 32, True): (64, 64, 4, 2),
    ("bwd_dq", "bf16", 64, False): (64, 64, 8, 2), ("bwd_dq", "bf16", 64, True): (64, 32, 8, 2),
    ("bwd_dq", "bf16", 128, False): (64, 32, 4, 2), ("bwd_dq", "bf16", 128, True): (32, 32, 8, 2),
    ("bwd_dq", "fp16", 32, False): (64, 32, 8, 2), ("bwd_dq", "fp16", 32, True): (64, 32, 8, 2),
    ("bwd_dq", "fp16", 64, False): (32, 32, 8, 2), ("bwd_dq", "fp16", 64, True): (16, 32, 8, 2),
    ("bwd_dq", "fp16", 128, False): (32, 32, 8, 2), ("bwd_dq", "fp16", 128, True): (32, 32, 8, 1),
    ("bwd_dkdv", "fma", 32, False): (32, 32, 8, 1), ("bwd_dkdv", "fma", 32, True): (32, 32, 8, 1),
    ("bwd_dkdv", "fma", 64, False): (16, 32, 8, 1), ("bwd_dkdv", "fma", 64, True): (16, 32, 4, 1),
    ("bwd_dkdv", "fma", 128, False): (16, 16, 8, 1), ("bwd_dkdv", "fma", 128, True): (16, 16, 8, 1),
    ("bwd_dkdv", "tf32", 32, False): (64, 64, 4, 2), ("bwd_dkdv", "tf32", 32, True): (32, 64, 8, 2),
    ("bwd_dkdv", "tf32", 64, False): (32, 64, 4, 2), ("bwd_dkdv", "tf32", 64, True): (32, 32, 4, 2),
    ("bwd_dkdv", "tf32", 128, False): (32, 32, 8, 2), ("bwd_dkdv", "tf32", 128, True): (32, 32, 8, 2),
    ("bwd_dkdv", "bf16", 32, False): (32, 128, 4, 3), ("bwd_dkdv", "bf16", 32, True): (32, 64, 4, 2),
    ("bwd_dkdv", "bf16", 64, False): (64, 64, 8, 2), ("bwd_dkdv", "bf16", 64, True): (32, 64, 8, 2),
    ("bwd_dkdv", "bf16", 128, False): (128, 32, 8, 3), ("bwd_dkdv", "bf16", 128, True): (32, 64, 8, 2),
    ("bwd_dkdv", "fp16", 32, False): (32, 64, 8, 2), ("bwd_dkdv", "fp16", 32, True): (32, 64, 8, 2),
    ("bwd_dkdv", "fp16", 64, False): (32, 32, 8, 2), ("bwd_dkdv", "fp16", 64, True): (16, 64, 8, 2),
    ("bwd_dkdv", "fp16", 128, False): (32, 32, 8, 2), ("bwd_dkdv", "fp16", 128, True): (32, 64, 8, 2),
}
_DROPOUT_MASK_TILE = (64, 64, 4, 1)

# Hopper-only tiles (compute capability 9.x): measured faster on an H200 (run 1's sweep,
# bench/results/nvidia-h200-2026-11-26-run1/tune.json: spill-free at run time, result checked
# against the shipped tile) and spill-free on sm_90 under both Triton versions, but spilling on
# sm_80, which keeps the _TILES entry. E = 128 without dropout, bf16 (ETTh1-folded), times of
# the backward with that tile: dQ 0.268 -> 0.239 ms; dQ + dK/dV 1.411 -> 1.128 ms (the dK/dV
# tile puts 128 prototypes on the MMA's M side, where 32 left Hopper's warpgroup MMA unused).
_TILES_SM90 = {
    ("bwd_dq", "bf16", 128, False): (64, 64, 4, 3),
    ("bwd_dkdv", "bf16", 128, False): (32, 128, 8, 3),
}


def dot_regime(dot: torch.dtype, precision: str) -> str:
    if dot == torch.float32:
        return "tf32" if precision == "tf32" else "fma"
    return SIG_DTYPE[dot]


@functools.lru_cache(maxsize=None)
def config_table() -> Dict[tuple, KernelConfig]:
    """Every launchable configuration, keyed by what selects it."""
    table: Dict[tuple, KernelConfig] = {}
    for role in ("fwd", "bwd_dq", "bwd_dkdv"):
        for data_dtype, dot, precision in _DTYPE_PATHS:
            for block_e in BLOCK_E_CHOICES:
                for has_dropout in (False, True):
                    tile_key = (role, dot_regime(dot, precision), block_e, has_dropout)
                    key = (role, data_dtype, dot, precision, block_e, has_dropout)
                    split = "not-sm90" if tile_key in _TILES_SM90 else None
                    table[key] = KernelConfig(role, data_dtype, dot, precision, block_e, has_dropout,
                                              *_TILES[tile_key], arch_split=split)
                    if split:
                        table[key + ("sm90",)] = KernelConfig(role, data_dtype, dot, precision, block_e,
                                                              has_dropout, *_TILES_SM90[tile_key],
                                                              arch_split="sm90")
    table[("dropout_mask",)] = KernelConfig("dropout_mask", torch.float32, torch.float32, "ieee", 0, True,
                                            *_DROPOUT_MASK_TILE)
    return table


def _dot_path(data_dtype: torch.dtype, device: torch.device, allow_tf32: bool) -> Tuple[torch.dtype, str]:
    """(dot dtype, input precision) for data of `data_dtype` on `device`."""
    dot = dot_dtype(data_dtype, device=device)
    capability = device_capability(device) if device.type == "cuda" else None
    tensor_core_tf32 = capability is not None and capability >= (8, 0)
    if dot == torch.bfloat16 and not tensor_core_tf32:
        dot = torch.float32  # Turing has no bf16 MMA
    return dot, input_precision(dot, allow_tf32=allow_tf32 and tensor_core_tf32)


def block_e_for(head_dim: int) -> int:
    return max(BLOCK_E_CHOICES[0], next_pow2(head_dim))


#: tile overrides for tuning (bench/tune_attention.py): (role, dot regime, BLOCK_E, dropout) ->
#: (BLOCK_R, BLOCK_S, num_warps, num_stages). Empty in normal use; set only through override_tiles.
_TILE_OVERRIDES: Dict[tuple, tuple] = {}
#: select_config's memo: (arguments, interpreter flag) -> KernelConfig
_SELECTED: Dict[tuple, KernelConfig] = {}


@contextlib.contextmanager
def override_tiles(overrides: Dict[tuple, tuple]):
    """Launch with other tiles inside the block (tuning only: a tile here has not been through
    the ahead-of-time spill check of tests/test_aot.py)."""
    for key, tile in overrides.items():
        if key not in _TILES:
            raise KeyError(f"no such tile key {key}; keys look like ('fwd', 'bf16', 32, False)")
        if len(tile) != 4 or tile[0] > MAX_BLOCK_R:
            raise ValueError(f"tile {tile} must be (BLOCK_R <= {MAX_BLOCK_R}, BLOCK_S, num_warps, num_stages)")
    saved = dict(_TILE_OVERRIDES)
    _TILE_OVERRIDES.update(overrides)
    _SELECTED.clear()  # select_config's memo must not serve the tiles from before
    try:
        yield
    finally:
        _TILE_OVERRIDES.clear()
        _TILE_OVERRIDES.update(saved)
        _SELECTED.clear()


def select_config(role: str, data_dtype: torch.dtype, head_dim: int, has_dropout: bool,
                  device: torch.device, allow_tf32: bool = False) -> KernelConfig:
    # looked up on every launch, so memoized (override_tiles clears the memo; the interpreter
    # flag changes the dot dtype, so it is part of the key)
    key = (role, data_dtype, head_dim, bool(has_dropout), device, bool(allow_tf32), interpreting())
    cfg = _SELECTED.get(key)
    if cfg is None:
        cfg = _SELECTED[key] = _select_config(role, data_dtype, head_dim, has_dropout, device, allow_tf32)
    return cfg


def _select_config(role: str, data_dtype: torch.dtype, head_dim: int, has_dropout: bool,
                   device: torch.device, allow_tf32: bool) -> KernelConfig:
    if role == "dropout_mask":
        return config_table()[("dropout_mask",)]
    dot, precision = _dot_path(data_dtype, device, allow_tf32)
    block_e = block_e_for(head_dim)
    key = (role, data_dtype, dot, precision, block_e, bool(has_dropout))
    table = config_table()
    cfg = table[key]
    if cfg.arch_split and device.type == "cuda" and arch_class(device) == 90:
        cfg = table[key + ("sm90",)]
    tile = _TILE_OVERRIDES.get(cfg.tile_key)
    if tile is not None:
        cfg = dataclasses.replace(cfg, block_r=tile[0], block_s=tile[1], num_warps=tile[2], num_stages=tile[3])
    return cfg


def _signature(cfg: KernelConfig) -> Dict[str, str]:
    constexpr_names = set(cfg.constexprs())
    signature = {}
    for name in _KERNELS[cfg.role].arg_names:
        if name in constexpr_names:
            signature[name] = "constexpr"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _INT8_POINTERS:
            signature[name] = "*i8"
        elif name == "seed_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*" + SIG_DTYPE[cfg.data_dtype]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def aot_configs() -> List[dict]:
    """Every configuration the launchers can choose, in the form triton.compile(ASTSource(...)) takes.

    "archs" lists the compute capabilities the configuration can be chosen on (bf16 MMA and TF32
    are never chosen below sm_80, where dispatch uses the fp32-dot configuration instead).
    """
    return [
        {
            "name": cfg.name,
            "fn": _KERNELS[cfg.role],
            "signature": _signature(cfg),
            "constexprs": cfg.constexprs(),
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
            "archs": cfg.archs,
            # multiples of 16 at every SPEC §2 shape (E = 32 or 128, H·E), so the JIT specializes
            # them there; rows_per_chunk is a multiple of BLOCK_R >= 16 always. d_model is not
            # (M4: 8), so it stays generic.
            "divisible_by_16": ("E", "stride_kv", "rows_per_chunk"),
        }
        for cfg in config_table().values()
    ]


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


#: role -> what the last launch of that role returned (on a GPU, the compiled kernel, whose
#: n_regs / n_spills the tuner reports)
last_launch: Dict[str, object] = {}


def rows_per_philox_group(num_protos: int) -> int:
    """Largest multiple of MAX_BLOCK_R rows whose counters (row·S + s, padding included) fit int32."""
    rows = (INT32_LIMIT - MAX_BLOCK_R) // max(num_protos + MAX_BLOCK_R, 1)
    return (rows // MAX_BLOCK_R) * MAX_BLOCK_R


def arch_class(device: torch.device) -> int:
    """The entry of ALL_ARCHS whose configurations serve this CUDA device."""
    major, minor = device_capability(device)
    return max(a for a in ALL_ARCHS if a <= max(10 * major + minor, ALL_ARCHS[0]))


def unsupported_reason(data_dtype: torch.dtype, head_dim: int, num_protos: int, num_rows: int,
                       has_dropout: bool, device: Optional[torch.device] = None,
                       allow_tf32: bool = False) -> Optional[str]:
    """Why this call has no kernel (the op layer then runs eager), or None."""
    if data_dtype not in TL_DTYPE:
        return f"dtype {data_dtype} has no kernel (float32, bfloat16, float16 only)"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head width d_keys={head_dim} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if has_dropout and rows_per_philox_group(num_protos) < MAX_BLOCK_R:
        return f"S={num_protos} prototypes is too many for the dropout counters"
    if device is not None and device.type == "cuda":
        arch = arch_class(device)
        for role in ("fwd", "bwd_dq", "bwd_dkdv"):
            cfg = select_config(role, data_dtype, head_dim, has_dropout, device, allow_tf32)
            if arch not in cfg.archs:
                return f"{cfg.name} is not built for sm_{arch} (it needs sm_{cfg.archs[0]}+)"
    return None


def _launch_params(cfg: KernelConfig) -> dict:
    """The keyword arguments of a launch with `cfg` (memoized: asked on every launch)."""
    key = (cfg, interpreting())
    params = _LAUNCH_PARAMS.get(key)
    if params is None:
        params = dict(cfg.constexprs())
        if not interpreting():
            params.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        elif cfg.data_dtype == torch.bfloat16 and cfg.dot_dtype == torch.float32 and "ROUND_TO_BF16" in params:
            # bf16 data on fp32 dots only because the interpreter cannot multiply bf16: round the
            # computed operands (q, P, dS) as the bf16 tensor-core path does
            params["ROUND_TO_BF16"] = True
        _LAUNCH_PARAMS[key] = params
    return params


_LAUNCH_PARAMS: Dict[tuple, dict] = {}


def _philox_args(num_protos: int, dropout_p: float, seed: torch.Tensor) -> Tuple[float, torch.Tensor, int]:
    return float(dropout_p), seed, rows_per_philox_group(num_protos)


def _seed_tensor(seed: Optional[torch.Tensor], dropout_p: float, device: torch.device) -> torch.Tensor:
    if seed is None:
        if dropout_p > 0.0:
            raise ValueError("dropout_p > 0 needs a seed tensor ([1] int64 on the device)")
        return torch.zeros((1,), dtype=torch.int64, device=device)
    return seed


def _shared_kv_stride(k: torch.Tensor, v: torch.Tensor) -> int:
    if k.stride(1) != 1 or v.stride(1) != 1 or k.stride(0) != v.stride(0):
        raise ValueError("k and v must have unit column stride and one shared row stride")
    return k.stride(0)


def attention_forward(
    target: torch.Tensor,  # target: [R, DM], contiguous
    wq: torch.Tensor,  # wq: [H*E, DM], contiguous
    bq: torch.Tensor,  # bq: [H*E]
    k: torch.Tensor,  # k: [S, H*E], unit column stride
    v: torch.Tensor,  # v: [S, H*E], same strides as k
    n_heads: int,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # [1] int64 on the device; needed when dropout_p > 0
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:  # out: [R, H*E] in the data dtype, lse: [H, R] fp32 (base 2)
    R, DM = target.shape
    S, HE = k.shape
    E = HE // n_heads
    seed = _seed_tensor(seed, dropout_p, target.device)
    cfg = select_config("fwd", target.dtype, E, dropout_p > 0.0, target.device, allow_tf32)
    stride_kv = _shared_kv_stride(k, v)
    out = torch.empty((R, HE), dtype=store_dtype(target.dtype), device=target.device)
    lse = torch.empty((n_heads, R), dtype=torch.float32, device=target.device)
    if R == 0:  # empty batch: nothing to launch (an empty grid is not launchable everywhere)
        return out.to(target.dtype), lse
    grid = (cdiv(R, cfg.block_r), n_heads)
    last_launch["fwd"] = reprogramming_fwd_kernel[grid](
        target, wq, bq, k, v, out, lse, R, S, DM, n_heads, E, stride_kv, _LOG2E / math.sqrt(E),
        *_philox_args(S, dropout_p, seed), **_launch_params(cfg))
    return out.to(target.dtype), lse


def dkdv_rows_per_chunk(num_rows: int, num_proto_blocks: int, n_heads: int, block_r: int) -> int:
    """Rows per dK/dV program: enough chunks to fill the GPU, each a whole number of row blocks
    (at least four, so a chunk amortizes loading its K/V tile).

    Depends on the shapes only, not on the GPU, so a problem always sums the same partials in
    the same order.
    """
    chunks = max(1, -(-DKDV_TARGET_PROGRAMS // (num_proto_blocks * n_heads)))
    rows = max(4 * block_r, -(-num_rows // chunks))
    return -(-rows // block_r) * block_r


def attention_backward(
    target: torch.Tensor,  # target: [R, DM], contiguous
    wq: torch.Tensor,  # wq: [H*E, DM], contiguous
    bq: torch.Tensor,  # bq: [H*E]
    k: torch.Tensor,  # k: [S, H*E]
    v: torch.Tensor,  # v: [S, H*E], same strides as k
    dout: torch.Tensor,  # dout: [R, H*E], contiguous, gradient of attention_forward's out
    lse: torch.Tensor,  # lse: [H, R] fp32, from attention_forward
    n_heads: int,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # [1] int64 on the device; needed when dropout_p > 0
    allow_tf32: bool = False,
    need_dkv: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dq: [R, H*E] in the data dtype; dkv: [S, 2*H*E] fp32 (dK columns, then dV columns) or None."""
    R, DM = target.shape
    S, HE = k.shape
    E = HE // n_heads
    has_dropout = dropout_p > 0.0
    stride_kv = _shared_kv_stride(k, v)
    philox = _philox_args(S, dropout_p, _seed_tensor(seed, dropout_p, target.device))
    qk_scale_log2, sm_scale = _LOG2E / math.sqrt(E), 1.0 / math.sqrt(E)

    if R == 0:  # empty batch: dQ is empty and dK, dV are sums over no rows
        dq = torch.empty((0, HE), dtype=target.dtype, device=target.device)
        return dq, (torch.zeros((S, 2 * HE), dtype=torch.float32, device=target.device) if need_dkv else None)
    dq_cfg = select_config("bwd_dq", target.dtype, E, has_dropout, target.device, allow_tf32)
    delta = torch.empty((n_heads, R), dtype=torch.float32, device=target.device)
    dq = torch.empty((R, HE), dtype=store_dtype(target.dtype), device=target.device)
    grid = (cdiv(R, dq_cfg.block_r), n_heads)
    last_launch["bwd_dq"] = reprogramming_bwd_dq_kernel[grid](
        target, wq, bq, k, v, dout, lse, delta, dq, R, S, DM, n_heads, E, stride_kv, qk_scale_log2, sm_scale,
        *philox, **_launch_params(dq_cfg))
    dq = dq.to(target.dtype)
    if not need_dkv:
        return dq, None

    kv_cfg = select_config("bwd_dkdv", target.dtype, E, has_dropout, target.device, allow_tf32)
    proto_blocks = cdiv(S, kv_cfg.block_s)
    rows_per_chunk = dkdv_rows_per_chunk(R, proto_blocks, n_heads, kv_cfg.block_r)
    n_chunks = cdiv(R, rows_per_chunk)
    # one fp32 slab per row chunk, summed in a fixed order below: deterministic, no float atomics
    dkv_partial = torch.empty((n_chunks, S, 2 * HE), dtype=torch.float32, device=target.device)
    grid = (proto_blocks, n_heads, n_chunks)
    last_launch["bwd_dkdv"] = reprogramming_bwd_dkdv_kernel[grid](
        target, wq, bq, k, v, dout, lse, delta, dkv_partial, R, S, DM, n_heads, E, stride_kv, rows_per_chunk,
        qk_scale_log2, sm_scale, *philox, **_launch_params(kv_cfg))
    dkv = dkv_partial[0] if n_chunks == 1 else dkv_partial.sum(0)
    return dq, dkv


def dropout_keep_mask(num_rows: int, num_protos: int, n_heads: int, dropout_p: float, seed: int,
                      device: torch.device) -> torch.Tensor:  # keep: [H, R, S] bool
    """The dropout mask the attention kernels apply for (seed, dropout_p), materialized (tests/debugging).

    keep[h, r, s] multiplies the probability of row r (of B'·L), head h, prototype s.
    """
    cfg = select_config("dropout_mask", torch.float32, 0, True, device)
    keep = torch.empty((n_heads, num_rows, num_protos), dtype=torch.int8, device=device)
    grid = (cdiv(num_rows, cfg.block_r), n_heads)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    dropout_keep_mask_kernel[grid](keep, num_rows, num_protos, n_heads, *_philox_args(num_protos, dropout_p, seed_t),
                                   **_launch_params(cfg))
    return keep.bool()
