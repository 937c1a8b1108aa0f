"""The reprogramming attention's forward: the online-softmax kernel over the prototypes and its
launcher, and the debug kernel that materializes the dropout mask the kernels draw.

Notation and layouts: kernels/attention.py. Per (block of BLOCK_R rows, head) the kernel streams
the prototypes in blocks of BLOCK_S: Z = scale·(X_h·Y_hᵀ + c_h) by a D-wide dot product, an online
softmax in base 2, dropout drawn in place (attention_device.dropout_keep), then P·V_h into the
head's columns of out, and one log-sum-exp per row and head for the backward.

The row-stationary loops (this forward, the backward's row pass) run their full prototype blocks
without masks and the last, partial block with them: in a loop bound by instruction issue, a
compare and a select per element are a tenth of the work.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .attention_device import (LOG2E, MC_ALIGN, check_operands, dot_operand, dropout_keep, load_protos, load_rows,
                               softmax_exp2)
from .attention_form import CoreForm
from .attention_tiles import PROTOTYPE_ALIGN, launch_params, rows_per_philox_group, select_config
from .host import cdiv, seed_tensor, store_dtype


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
    y_t, v, bias = load_protos(mc_head, v_head, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask, D, stride_mc_d,
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
    probs = softmax_exp2(logits - new_max[:, None], proto_start, POLY_EIGHTHS)
    # the softmax normalizer counts every prototype; dropout acts on the normalized probabilities
    row_sum = row_sum + tl.sum(probs, axis=1)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S,
                            dropout_p)
        probs = tl.where(keep, probs, 0.0)
    acc = tl.dot(dot_operand(probs, DOT_DTYPE, ROUND_TO_BF16), v, acc, input_precision=INPUT_PRECISION)
    return acc, row_sum, new_max


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
    POLY_EIGHTHS: tl.constexpr,  # share of the exponentials on the FMA units (softmax_exp2), in eighths
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
    stride_mc_h, stride_mc_d = stride_mc_h8 * MC_ALIGN, stride_mc_d8 * MC_ALIGN  # 16-byte aligned rows
    x = load_rows(x_ptr, offs_r, r_mask, head * x_head_stride + offs_d, d_mask, stride_x_r, DOT_DTYPE)
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
        keep = dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S, dropout_p)
        ptrs = keep_ptr + (head * R + offs_r.to(tl.int64))[:, None] * S + offs_s[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=r_mask[:, None] & (offs_s < S)[None, :])


def attention_forward(
    x: torch.Tensor,  # x: [R, *], logit operand rows (padded target, or Q on the standard form)
    mc: torch.Tensor,  # mc: [H, W, S']: Y_hᵀ in rows [0, D), c_h in row D when factorized
    v: torch.Tensor,  # v: [S, H, E]
    form: CoreForm,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # [1] int64 on the device; needed when dropout_p > 0
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:  # out: [R, H*E] in x's dtype, lse: [H, R] fp32 (base 2)
    seed = seed_tensor(seed, dropout_p, x.device)
    check_operands(x, mc, v)
    R = x.shape[0]
    S, H, E = v.shape
    cfg = select_config("fwd", x.dtype, form, dropout_p > 0.0, x.device, allow_tf32)
    out = torch.empty(R, H * E, dtype=store_dtype(x.dtype), device=x.device)
    lse = torch.empty(H, R, dtype=torch.float32, device=x.device)
    if R:  # no rows, nothing to launch (an empty grid is not launchable everywhere)
        attention_fwd_kernel[(cdiv(R, cfg.block_r), H)](
            x, mc, v, out, lse, R, S, form.d_logit, H, E,
            x.stride(0), form.x_head_stride, mc.stride(0) // PROTOTYPE_ALIGN, mc.stride(1) // PROTOTYPE_ALIGN,
            v.stride(0), v.stride(1), int(form.factorized), LOG2E * form.scale, float(dropout_p), seed,
            rows_per_philox_group(S), **launch_params(cfg))
    return out.to(x.dtype), lse


def dropout_keep_mask(num_rows: int, num_protos: int, n_heads: int, dropout_p: float, seed: int,
                      device: torch.device) -> torch.Tensor:  # keep: [H, R, S] bool
    """The dropout mask the attention kernels apply for (seed, dropout_p), materialized (tests/debugging).

    keep[h, r, s] multiplies the probability of row r (of B'·L), head h, prototype s.
    """
    cfg = select_config("dropout_mask", torch.float32, None, True, device)
    keep = torch.empty((n_heads, num_rows, num_protos), dtype=torch.int8, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    dropout_keep_mask_kernel[(cdiv(num_rows, cfg.block_r), n_heads)](
        keep, num_rows, num_protos, n_heads, float(dropout_p), seed_t, rows_per_philox_group(num_protos),
        **launch_params(cfg))
    return keep.bool()
